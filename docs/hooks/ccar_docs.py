"""MkDocs hooks of ccar's documentation site (``hooks:`` in mkdocs.yml); no plugin beyond mkdocs' own API.

1. **The option reference** (``docs/options.md``): the ``<!-- ccar:options -->`` marker is replaced at build time by
   tables generated from the configuration dataclasses (:mod:`ccar.config.schema`): every key with its type, its
   default, its valid values (the rules :mod:`ccar.config.validation` checks, the registries of datasets, models and
   losses, and the options each loss takes with its default) and the comment beside the field in the source. The
   page cannot drift from the code: a new key appears by itself.
2. **Links to repository files outside docs/** (``[configs/default.yaml](../configs/default.yaml)``): they work when
   the Markdown is read in the repository; for the site the hook checks that the file exists (a missing one is a
   warning, so ``mkdocs build --strict`` fails), ships a copy of it under ``repo/`` in the site and points the link
   there. Links between pages are left to MkDocs' own validation (mkdocs.yml ``validation:``).
3. **Docstrings as written for doctest**: a ``>>>`` block becomes a ``pycon`` code block (Markdown would read it as
   nested quotes; doctest's ``# doctest:`` flags are dropped), Sphinx roles (``:func:`x```) become plain code and a
   closing ``::`` a colon, so mkdocstrings renders the docstrings as they are in the source.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import logging
import posixpath
import re
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from markdown import Extension
from markdown.preprocessors import Preprocessor

log = logging.getLogger("mkdocs.hooks.ccar_docs")

OPTIONS_MARKER = "<!-- ccar:options -->"
REPO_PREFIX = "repo"  # where copies of repository files linked from the pages live in the site

# --- Markdown: links --------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*(```+|~~~+)")
_LINK = re.compile(r"(!?\[(?:[^\[\]]|\[[^\]]*\])*\])\(\s*<?([^)\s>]+)>?(\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"(`+)(?:.+?)\1")


def _prose_segments(markdown: str) -> Iterator[Tuple[bool, str]]:
    """(is_prose, text) pieces of a page: fenced code blocks are not prose."""
    fence: Optional[str] = None
    block: List[str] = []
    for line in markdown.splitlines(keepends=True):
        m = _FENCE.match(line)
        if fence is None and m:
            if block:
                yield True, "".join(block)
                block = []
            fence = m.group(1)
            yield False, line
        elif fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and line.strip().strip(fence[0]) == "":
                fence = None
            yield False, line
        else:
            block.append(line)
    if block:
        yield True, "".join(block)


def _split_spans(text: str) -> Iterator[Tuple[bool, str]]:
    """(is_prose, text) pieces of a paragraph: inline code spans are not prose."""
    start = 0
    for m in _CODE_SPAN.finditer(text):
        yield True, text[start:m.start()]
        yield False, m.group(0)
        start = m.end()
    yield True, text[start:]


class _Link(typing.NamedTuple):
    start: int
    end: int
    label: str  # with its brackets (and the ! of an image)
    target: str
    title: str


def _links(text: str) -> Iterator[_Link]:
    """Markdown links of a prose block; a link written inside a code span is not one (the spans are masked, keeping
    every offset, so a code span in a link's text does not hide the link)."""
    masked = _CODE_SPAN.sub(lambda m: m.group(1) + "\0" * (len(m.group(0)) - 2 * len(m.group(1))) + m.group(1), text)
    for m in _LINK.finditer(masked):
        yield _Link(m.start(), m.end(), text[m.start(1):m.end(1)], m.group(2), m.group(3) or "")


def relative_links(markdown: str) -> List[str]:
    """The link targets of a Markdown text that are relative paths (no scheme, not an anchor of the page itself),
    outside code. Used by the hook and by tests/test_docs.py for README.md."""
    targets = []
    for prose, text in _prose_segments(markdown):
        if prose:
            for m in _links(text):
                target = m.target
                if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith(("#", "/")):
                    targets.append(target)
    return targets


def _outside_target(target: str, page_uri: str) -> Optional[str]:
    """The repository path of a link that leaves docs/ (``../configs/x.yaml`` from ``quickstart.md``), else None."""
    path = target.split("#", 1)[0]
    if not path:
        return None
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(page_uri), path))
    if not joined.startswith("../"):
        return None
    return joined[len("../"):]


def _rewrite_links(markdown: str, page_uri: str, repo_root: Path, docs_dir_name: str) -> str:
    out = []
    for prose, text in _prose_segments(markdown):
        if prose:
            pieces, start = [], 0
            for m in _links(text):
                pieces += [text[start:m.start], _rewrite_one(m, text[m.start:m.end], page_uri, repo_root,
                                                             docs_dir_name)]
                start = m.end
            text = "".join(pieces) + text[start:]
        out.append(text)
    return "".join(out)


def _rewrite_one(link: _Link, original: str, page_uri: str, repo_root: Path, docs_dir_name: str) -> str:
    label, target, title = link.label, link.target, link.title
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return original
    repo_path = _outside_target(target, page_uri)
    if repo_path is None:
        return original
    file, in_docs = repo_root / repo_path, repo_path.startswith(docs_dir_name + "/")
    if in_docs or repo_path.startswith("..") or not file.is_file():
        why = ("is inside the docs folder (link to it relative to the page)" if in_docs
               else "is not a file in the repository" if not file.exists() else "is not a file (link to a file)")
        log.warning("Doc file '%s' links to '%s', which %s", page_uri, target, why)
        return original
    anchor = target[len(target.split("#", 1)[0]):]
    new = posixpath.relpath(f"{REPO_PREFIX}/{repo_path}", posixpath.dirname(page_uri) or ".")
    return f"{label}({new}{anchor}{title})"


# --- Markdown: doctest blocks and Sphinx roles in docstrings ----------------------------------------------------------

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj|ref):`~?([^`]+)`")


class _DocstringSyntax(Preprocessor):
    """Outside fences: ``>>>`` blocks to ``pycon`` fences (up to the next blank line), ``:func:`x``` to ```x```, and
    a paragraph's closing ``::`` (reStructuredText's literal-block marker) to ``:``."""

    def run(self, lines: List[str]) -> List[str]:
        out: List[str] = []
        fence: Optional[str] = None
        i = 0
        while i < len(lines):
            line = lines[i]
            m = _FENCE.match(line)
            if m:
                if fence is None:
                    fence = m.group(1)
                elif line.strip() == fence[0] * len(line.strip()) and len(line.strip()) >= len(fence):
                    fence = None
                out.append(line)
                i += 1
                continue
            doctest = re.match(r"^(\s*)>>> ", line)
            if fence is None and doctest:
                indent = doctest.group(1)
                block = []
                while i < len(lines) and lines[i].strip():
                    text = lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip()
                    block.append(re.sub(r"\s*# doctest:.*$", "", text))  # doctest's flags are for the test runner
                    i += 1
                if out and out[-1].strip():
                    out.append("")
                out += [indent + "```pycon"] + [indent + b for b in block] + [indent + "```", ""]
                continue
            if fence is None:  # reStructuredText: roles, and "text::" before a literal block
                line = re.sub(r"(\S)::\s*$", r"\1:", _ROLE.sub(r"`\1`", line))
            out.append(line)
            i += 1
        return out


class DocstringSyntax(Extension):
    def extendMarkdown(self, md):  # noqa: N802 (Markdown's API)
        md.preprocessors.register(_DocstringSyntax(md), "ccar_docstring_syntax", 40)


# --- The option reference ---------------------------------------------------------------------------------------------


def _field_comments(cls) -> Dict[str, str]:
    """The comment beside each field of a dataclass in its source, with the comment-only lines that follow it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    body = ast.parse(source).body[0].body
    result = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        end = body[i + 1].lineno if i + 1 < len(body) else len(lines) + 1
        text = [comments[node.end_lineno]] if node.end_lineno in comments else []
        text += [comments[n] for n in range(node.end_lineno + 1, end)
                 if n in comments and lines[n - 1].strip().startswith("#")]
        result[node.target.id] = " ".join(text)
    return result


def _class_doc(cls) -> str:
    doc = cls.__doc__ or ""
    if doc.startswith(cls.__name__ + "("):  # the signature dataclasses writes when there is no docstring
        return ""
    return inspect.cleandoc(doc)


def _render_fstring_part(node: ast.AST, namespace: Dict[str, Any]) -> str:
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.FormattedValue):
        try:  # module constants (`', '.join(AMP_MODES)`) evaluate; the config's own values stay symbolic
            return str(eval(compile(ast.Expression(node.value), "<rule>", "eval"), dict(namespace)))  # noqa: S307
        except Exception:
            expr = re.sub(r"\b(?:cfg|o|m)\.", "", ast.unparse(node.value))
            return f"<{expr}>"
    return ast.unparse(node)


def _rule_text(node: ast.AST, namespace: Dict[str, Any]) -> Optional[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_render_fstring_part(v, namespace) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _rule_text(node.left, namespace), _rule_text(node.right, namespace)
        return None if left is None or right is None else left + right
    return None


def validation_rules() -> Dict[str, List[str]]:
    """Key -> the rules :func:`ccar.config.validate` checks for it (``_check(ok, "key", "rule", value)`` calls with
    a literal key), and ``synthetic.*`` -> the rules of ``GaussianShape.problems``."""
    from ccar.config import validation
    from ccar.data import synthetic

    rules: Dict[str, List[str]] = {}
    namespace = vars(validation)
    for node in ast.walk(ast.parse(inspect.getsource(validation))):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_check" and len(node.args) >= 3
                and isinstance(node.args[1], ast.Constant)):
            text = _rule_text(node.args[2], namespace)
            if text and text not in rules.setdefault(node.args[1].value, []):
                rules[node.args[1].value].append(text)
    problems = ast.parse(textwrap.dedent(inspect.getsource(synthetic.GaussianShape.problems)))
    for node in ast.walk(problems):
        if (isinstance(node, ast.Tuple) and len(node.elts) == 3
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts[::2])):
            rules.setdefault(f"synthetic.{node.elts[0].value}", []).append(node.elts[2].value)
    return rules


def registries() -> Dict[str, Tuple[str, ...]]:
    """Keys whose valid values are a registry or a tuple of the code (the code that reads the key checks them)."""
    from ccar.config import schema
    from ccar.data.datasets import DATASETS
    from ccar.data.profiles import PROFILES
    from ccar.losses import BASES, LOSS_NAMES
    from ccar.losses.registry import FAMILIES
    from ccar.models import MODELS

    return {"dataset": tuple(DATASETS), "profile": PROFILES, "loss.name": LOSS_NAMES,
            "loss.base": tuple(BASES) + tuple(FAMILIES), "model.name": MODELS, "optim.name": schema.OPTIMIZERS,
            "optim.schedule": schema.SCHEDULES}


def loss_option_users() -> Dict[str, List[Tuple[str, Any]]]:
    """loss.* option -> [(loss, its default)]: the base losses' options (``BASE_OPTIONS``), CCAR's own keyword
    arguments and those every loss takes (DRW)."""
    from ccar.losses.functional import BASE_OPTIONS
    from ccar.losses.modules import CCARLoss, LongTailLoss

    users: Dict[str, List[Tuple[str, Any]]] = {}
    for loss, options in BASE_OPTIONS.items():
        for option, default in options.items():
            users.setdefault(option, []).append((loss, default))
    every = set(inspect.signature(LongTailLoss.__init__).parameters)
    for name, p in inspect.signature(CCARLoss.__init__).parameters.items():
        if p.default is not inspect.Parameter.empty and name not in every and name != "base":
            users.setdefault(name, []).append(("ccar", p.default))
    for name, p in inspect.signature(LongTailLoss.__init__).parameters.items():
        if name.startswith("drw_"):
            users.setdefault(name, []).append(("every loss", p.default))
    return users


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or null"
    if origin in (list, List):
        return f"list of {_type_name(args[0])}" if args else "list"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value == 2.718281828459045:
            return "e"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"' if value == "" or value.strip() != value else value
    return str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _cell(text: str) -> str:
    """Text of a table cell: HTML, emphasis and cell separators escaped outside code spans."""
    out = []
    for prose, part in _split_spans(text):
        if prose:
            part = part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            part = part.replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")
        out.append(part)
    return "".join(out).replace("\n", " ")


def _unset(text: str) -> str:
    return f" (unset: {_cell(text)})" if text else ""


def _code(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _sections(cls, prefix: str = "", comment: str = "") -> Iterator[Tuple[str, type, str]]:
    """(prefix, dataclass, comment of the field holding it), depth first: the top level, then each section."""
    yield prefix, cls, comment
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        default = _default(f)
        if dataclasses.is_dataclass(default):
            yield from _sections(type(default), f"{prefix}{f.name}.", comments.get(f.name, ""))


def option_rows(cls=None) -> List[Dict[str, str]]:
    """One row per leaf key: key, section, type, default, unset (a loss option's default per loss), valid,
    description (plain text, not escaped)."""
    from ccar.config.schema import TrainConfig

    cls = cls or TrainConfig
    rules, regs, users = validation_rules(), registries(), loss_option_users()
    rows = []
    for prefix, section, _ in _sections(cls):
        hints, comments = typing.get_type_hints(section), _field_comments(section)
        for f in dataclasses.fields(section):
            default = _default(f)
            if dataclasses.is_dataclass(default):
                continue
            key = prefix + f.name
            valid = []
            if key in regs:
                valid.append("one of " + ", ".join(regs[key]))
            valid += [r for r in rules.get(key, []) if not (key in regs and r.startswith("one of "))]
            unset = ""
            if prefix == "loss." and f.name in users and default is None:
                by_default: Dict[str, List[str]] = {}
                for loss, value in users[f.name]:
                    if value is not None:
                        by_default.setdefault(_value(value), []).append(loss)
                unset = "; ".join(f"{v} for {', '.join(losses)}" for v, losses in by_default.items())
            rows.append({"key": key, "section": prefix.rstrip("."), "type": _type_name(hints[f.name]),
                         "default": _value(default), "unset": unset, "valid": "; ".join(valid),
                         "description": comments.get(f.name, "")})
    return rows


def option_reference() -> str:
    """The Markdown of the option reference: one table per section of :class:`ccar.config.TrainConfig`."""
    from ccar.config.schema import TrainConfig

    rows = option_rows(TrainConfig)
    parts = []
    for prefix, section, comment in _sections(TrainConfig):
        name = prefix.rstrip(".")
        title = f"`{name}.*`" if name else "Top-level keys"
        parts.append(f"## {title}\n")
        intro = " ".join(x[:1].upper() + x[1:] + ("" if x.endswith(".") else ".")
                         for x in (_class_doc(section) if name else "", comment) if x)
        if intro:
            parts.append(_cell(intro).replace("\\_", "_") + f" (`{section.__module__}.{section.__name__}`)\n")
        else:
            parts.append(f"`{section.__module__}.{section.__name__}`\n")
        parts.append("| key | type | default | valid values | what it does |\n|---|---|---|---|---|")
        for row in rows:
            if row["section"] == name:
                parts.append(f"| <code id=\"{row['key']}\">{row['key']}</code> | {row['type']} | "
                             f"{_code(row['default'])}{_unset(row['unset'])} | {_cell(row['valid'])} | "
                             f"{_cell(row['description'])} |")
        parts.append("")
    return "\n".join(parts)


# --- MkDocs events ----------------------------------------------------------------------------------------------------


def on_config(config):
    config.markdown_extensions.append(DocstringSyntax())
    return config


def _repo_root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_files(files, config):
    """Ship a copy of every repository file that a page links to (``repo/<path>`` in the site)."""
    from mkdocs.structure.files import File

    root, docs = _repo_root(config), Path(config.docs_dir).resolve()
    wanted = set()
    for file in files.documentation_pages():
        for target in relative_links(file.content_string):
            repo_path = _outside_target(target, file.src_uri)
            if repo_path and (root / repo_path).is_file() and not (root / repo_path).resolve().is_relative_to(docs):
                wanted.add(repo_path)
    for repo_path in sorted(wanted):
        if files.get_file_from_path(f"{REPO_PREFIX}/{repo_path}") is None:
            files.append(File.generated(config, f"{REPO_PREFIX}/{repo_path}", abs_src_path=str(root / repo_path)))
    return files


def on_page_markdown(markdown, page, config, files):
    docs_name = Path(config.docs_dir).resolve().relative_to(_repo_root(config)).as_posix()
    markdown = _rewrite_links(markdown, page.file.src_uri, _repo_root(config), docs_name)
    if page.file.src_uri == "options.md":
        if OPTIONS_MARKER not in markdown:
            log.warning("options.md has lost its marker %s: the option reference is not generated", OPTIONS_MARKER)
        markdown = markdown.replace(OPTIONS_MARKER, option_reference())
    return markdown
