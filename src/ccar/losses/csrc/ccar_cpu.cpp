// Fused CCAR loss for CPU tensors: one autograd node with a native backward.
//
// Built on first use by ccar/losses/native.py (torch.utils.cpp_extension); the pure-PyTorch path in
// functional.py (_FusedCCAR) computes the same thing and is used when this kernel is unavailable.
//
// Every per-sample loss is a function h(s) of s = log p_t alone (p_t = softmax(z)_y on the adjusted logits z), so
// dloss/dz = h'(s) * (onehot - softmax(z)). The forward computes log_softmax once and runs the per-sample math in
// one loop; the backward is log_softmax's own backward fed with h'(s) at the target entries.
//
//   z       = scale * (logits + shift - margin_y * onehot)        (LA/BS shift, LDAM margin and scale)
//   Omega   = exp((omega - p_t) * log_base[branch][y])             (branch 1 when p_t >= omega)
//   loss_i  = Omega * w_y * g(s),  g = -(1 - p_t)^gamma * s        (gamma 0: cross-entropy)

#include <torch/extension.h>

#include <algorithm>
#include <cmath>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

enum Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };

template <typename T>
double per_sample(const T* log_probs, const int64_t* y, const T* log_base, const T* class_weight, int64_t n, int64_t c,
             T omega, T gamma, bool detach, T* loss, T* dloss_ds) {
  double total = 0;  // the batch sum, accumulated in double
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = y[i];
    const T s = log_probs[i * c + k];
    const T p = std::exp(s);
    const T log_b = log_base[k + (p >= omega ? c : 0)];
    T weight = std::exp((omega - p) * log_b);
    if (class_weight) weight *= class_weight[k];
    T g, g_prime;  // g(s) and dg/ds
    if (gamma != T(0)) {
      // 1 - p = -expm1(s), exact near p = 1; the floor keeps gamma < 1 finite there.
      const T q = std::max(-std::expm1(s), T(1e-30));
      const T q_gamma = std::pow(q, gamma);
      g = -q_gamma * s;
      g_prime = gamma * (q_gamma / q) * p * s - q_gamma;
    } else {
      g = -s;
      g_prime = -1;
    }
    const T value = weight * g;
    if (loss) {
      loss[i] = value;
    } else {
      total += value;
    }
    // dOmega/ds = -log_b * Omega * p, so d(Omega g)/ds = Omega (g' - log_b p g); a detached Omega drops that term.
    dloss_ds[i] = detach ? weight * g_prime : weight * (g_prime - log_b * p * g);
  }
  return total;
}

Tensor table(const c10::optional<Tensor>& t, at::ScalarType dtype) {
  return t.has_value() && t->defined() ? t->to(at::kCPU, dtype).contiguous() : Tensor();
}

struct FusedCCAR : public torch::autograd::Function<FusedCCAR> {
  static Tensor forward(AutogradContext* ctx, const Tensor& logits, const Tensor& targets, const Tensor& log_base,
                        const c10::optional<Tensor>& shift, const c10::optional<Tensor>& margins, double scale,
                        const c10::optional<Tensor>& class_weight, double omega, double gamma, bool detach,
                        int64_t reduction) {
    // Every check the Python path makes, so that the caller can skip its own; it re-runs them on an error to
    // phrase the message.
    TORCH_CHECK(logits.device().is_cpu() && targets.device().is_cpu(), "ccar: the compiled kernel takes CPU tensors");
    TORCH_CHECK_VALUE(logits.dim() == 2 && at::isFloatingType(logits.scalar_type()),
                      "ccar: logits must be floating point with shape (batch, classes)");
    TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logits.size(0),
                      "ccar: targets must have shape (batch,) to match the logits");
    TORCH_CHECK_VALUE(at::isIntegralType(targets.scalar_type(), /*includeBool=*/false),
                      "ccar: targets must be integer class indices");
    const auto dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;  // float32 math for halves
    const int64_t n = logits.size(0), c = logits.size(1);
    TORCH_CHECK_VALUE(log_base.numel() == 2 * c, "ccar: class_counts has ", log_base.numel() / 2,
                      " entries but logits have ", c, " classes");
    const Tensor y = targets.to(at::kCPU, at::kLong).contiguous();
    const int64_t* yp = y.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK_INDEX(yp[i] >= 0 && yp[i] < c, "ccar: target value ", yp[i], " is out of range for ", c,
                        " classes (valid: 0..", c - 1, ")");
    }
    Tensor z = logits.to(dtype);
    const Tensor shift_t = table(shift, dtype), margin_t = table(margins, dtype);
    if (shift_t.defined()) z = z + shift_t;
    if (margin_t.defined()) {
      z = z.is_same(logits) ? z.clone(at::MemoryFormat::Contiguous) : z.contiguous();
      AT_DISPATCH_FLOATING_TYPES(dtype, "ccar_margin", [&] {
        scalar_t* zp = z.data_ptr<scalar_t>();
        const scalar_t* mp = margin_t.data_ptr<scalar_t>();
        for (int64_t i = 0; i < n; ++i) zp[i * c + yp[i]] -= mp[yp[i]];
      });
    }
    if (scale != 1.0) z = z * scale;
    const Tensor log_probs = at::_log_softmax(z, 1, false).contiguous();
    const Tensor base_t = log_base.to(at::kCPU, dtype).contiguous(), weight_t = table(class_weight, dtype);
    Tensor loss = reduction == kNone ? at::empty({n}, log_probs.options()) : at::empty({}, log_probs.options());
    Tensor dloss_ds = at::empty({n}, log_probs.options());
    AT_DISPATCH_FLOATING_TYPES(dtype, "ccar_forward", [&] {
      const double total = per_sample<scalar_t>(
          log_probs.data_ptr<scalar_t>(), yp, base_t.data_ptr<scalar_t>(),
          weight_t.defined() ? weight_t.data_ptr<scalar_t>() : nullptr, n, c, static_cast<scalar_t>(omega),
          static_cast<scalar_t>(gamma), detach, reduction == kNone ? loss.data_ptr<scalar_t>() : nullptr,
          dloss_ds.data_ptr<scalar_t>());
      if (reduction != kNone) {
        *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(reduction == kMean ? total / static_cast<double>(n) : total);
      }
    });
    ctx->save_for_backward({log_probs, y, dloss_ds});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dtype"] = static_cast<int64_t>(logits.scalar_type());
    return loss;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &log_probs = saved[0], &y = saved[1], &dloss_ds = saved[2];
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t n = log_probs.size(0), c = log_probs.size(1);
    const Tensor grad_out = grads[0].to(log_probs.scalar_type()).contiguous();
    // d loss / d log_probs: h'(s) * grad at the target entries, zero elsewhere.
    Tensor grad_lp = at::zeros_like(log_probs);
    AT_DISPATCH_FLOATING_TYPES(log_probs.scalar_type(), "ccar_backward", [&] {
      scalar_t* gp = grad_lp.data_ptr<scalar_t>();
      const scalar_t* kp = dloss_ds.data_ptr<scalar_t>();
      const scalar_t* go = grad_out.data_ptr<scalar_t>();
      const int64_t* yp = y.data_ptr<int64_t>();
      const scalar_t factor = (reduction == kMean && n > 0) ? scalar_t(1) / static_cast<scalar_t>(n) : scalar_t(1);
      for (int64_t i = 0; i < n; ++i) {
        gp[i * c + yp[i]] = kp[i] * (reduction == kNone ? go[i] : go[0] * factor) * static_cast<scalar_t>(scale);
      }
    });
    Tensor grad = at::_log_softmax_backward_data(grad_lp, log_probs, 1, log_probs.scalar_type());
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    if (grad.scalar_type() != dtype) grad = grad.to(dtype);
    return {grad, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor ccar_loss(const Tensor& logits, const Tensor& targets, const Tensor& log_base, const c10::optional<Tensor>& shift,
                 const c10::optional<Tensor>& margins, double scale, const c10::optional<Tensor>& class_weight,
                 double omega, double gamma, bool detach, int64_t reduction) {
  return FusedCCAR::apply(logits, targets, log_base, shift, margins, scale, class_weight, omega, gamma, detach,
                          reduction);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ccar: fused CCAR loss for CPU tensors";
  m.def("ccar_loss", &ccar_loss, "CCAR over a base loss; log_base is (2, C): log(base - f) and log(base - 1 + f)");
}
