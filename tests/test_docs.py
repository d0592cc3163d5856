"""The documentation: README.md stays a short front page whose links resolve, and the site (mkdocs.yml, docs/) builds
with ``mkdocs build --strict`` — a link to a missing page, heading or repository file, or a nav entry without its
page, fails it — with an option reference that covers every key of the configuration."""

from __future__ import annotations

import dataclasses
import html
import logging
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150


def _readme_links(text: str):
    """Targets of the Markdown links in README.md outside code, other than web addresses and in-page anchors."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "`code`", text)
    for target in re.findall(r"\]\(\s*<?([^)\s>]+)", text):
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("#"):
            yield target


def test_readme_is_a_short_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into a docs/ page"


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = list(_readme_links(text))
    assert any(t.startswith("docs/") for t in targets), "README.md should link into the documentation pages"
    missing = [t for t in targets if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


# --- the site ---------------------------------------------------------------------------------------------------------


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def build_site(config_file: Path, site_dir: Path):
    """``mkdocs build --strict -f CONFIG -d SITE`` in this process (as the CLI runs it); returns (aborted, warnings)."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]' (make installs it)")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    handler = _Warnings()
    logger = logging.getLogger("mkdocs")
    logger.addHandler(handler)
    aborted = False
    try:
        cfg = load_config(str(config_file), strict=True, site_dir=str(site_dir))
        cfg.plugins.on_startup(command="build", dirty=False)
        try:
            build(cfg)
        except Abort:
            aborted = True
        finally:
            cfg.plugins.on_shutdown()
    finally:
        logger.removeHandler(handler)
    return aborted, handler.messages


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NO_MKDOCS_2_WARNING", "1")  # mkdocs-material's notice about MkDocs 2 (printed, not a warning)
    try:
        out = tmp_path_factory.mktemp("site")
        aborted, warnings = build_site(ROOT / "mkdocs.yml", out)
    finally:
        mp.undo()
    return out, aborted, warnings


def test_site_builds_strict(site):
    out, aborted, warnings = site
    assert not aborted and not warnings, "mkdocs build --strict failed:\n" + "\n".join(warnings)
    for page in ("index.html", "quickstart/index.html", "tune/index.html", "options/index.html",
                 "results/index.html", "benchmarks/index.html", "reliability/index.html", "api/losses/index.html"):
        assert (out / page).is_file(), page
    # a repository file that a page links to is shipped with the site
    assert (out / "repo" / "configs" / "default.yaml").read_bytes() == (ROOT / "configs" / "default.yaml").read_bytes()


def _leaf_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            yield from _leaf_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_option_reference_covers_every_key(site):
    from ccar.config import TrainConfig

    out, aborted, _ = site
    assert not aborted
    page = (out / "options" / "index.html").read_text(encoding="utf-8")
    rows = {m.group(1): html.unescape(re.sub(r"<[^>]+>", "", m.group(2)))
            for m in re.finditer(r'<tr>\s*<td><code id="([^"]+)">.*?</td>(.*?)</tr>', page, re.S)}
    keys = list(_leaf_keys(TrainConfig))
    assert len(keys) > 100
    assert sorted(rows) == sorted(keys), "the option reference and ccar.config disagree"
    assert "bf16" in rows["amp"] and "auto" in rows["amp"]          # valid values from the validation rules
    assert "1.0 for la" in rows["loss.tau"]                          # a loss option's default, per loss
    assert "folder" in rows["dataset"] and "csv" in rows["dataset"]  # the dataset registry
    assert "0.1" in rows["optim.lr"]                                 # the default


def test_broken_links_fail_the_strict_build(tmp_path, monkeypatch):
    """A copy of the site with a link to a missing page, a nav entry without its page and a link to a missing
    repository file: the strict build fails, naming each (and nothing else)."""
    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copytree(ROOT / "docs", copy / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    for entry in ROOT.iterdir():  # the code and the files pages link to, as they are
        if entry.name not in ("docs", "mkdocs.yml", "site", ".git", ".venv", "runs", "data"):
            (copy / entry.name).symlink_to(entry)
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert "  - Home: index.md\n" in config
    (copy / "mkdocs.yml").write_text(config.replace("  - Home: index.md\n",
                                                    "  - Home: index.md\n  - Missing: no-such-nav-page.md\n"))
    page = copy / "docs" / "quickstart.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [a page](no-such-page.md) and "
                    "[a recipe](../configs/no-such-recipe.yaml).\n", encoding="utf-8")

    aborted, warnings = build_site(copy / "mkdocs.yml", tmp_path / "site")

    assert aborted, "the strict build passed despite broken links"
    broken = ("no-such-page.md", "no-such-nav-page.md", "no-such-recipe.yaml")
    for name in broken:
        assert any(name in w for w in warnings), f"no warning names {name}: {warnings}"
    assert all(any(name in w for name in broken) for w in warnings), warnings
