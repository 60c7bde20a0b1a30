// Merged-weight LoRA projection as a C++ autograd Function: the host side of ops._MergedLoRAFunction.
// Built by setup.py as its own small C++-only extension, clora_fast._host (no CUDA toolkit needed; built
// by default, skipped with CLORA_FAST_BUILD_HOST=0, and the package falls back to the Python Function
// when it is missing).
//
// Math (L equal segments of n output rows; W_l [n, K], A_l [r, K], B_l [n, r], scale s_l):
//   forward   W_eff = [W_l + s_l B_l @ A_l]  ([L*n, K]),  y = x @ [W_eff; A]^T (+ [bias; 0])
//             (the A rows only with split outputs and a trainable B: the extra columns are xa = x @ A^T)
//   backward  dx = sum_l dy_l @ W_eff_l,  dA = [s_l (dy_l @ B_l)^T] @ x,  dB_l = s_l dy_l^T @ xa_l,
//             dW_l = dy_l^T @ x,  dbias_l = sum_rows(dy_l)
//   With x and A trainable and B stacked, the weight kept for dx is [W_eff | Z], Z = blockdiag(s_l B_l)
//   ([L*n, L*r]), so that sum_l dy_l @ [W_eff_l | Z_l] = [dx | G^T] and dA = G @ x (dx: a column block).
//   Float32 A / B of a half-precision x (master factors) are rounded to x's dtype by the writes that place them
//   in that buffer (the A rows' copy, Z's product) and the fold reads them there (W_l + Z_l @ A_l); their
//   gradients are computed in x's dtype and returned in float32.
// Shapes: x [..., K]; Ws / As / Bs each one tensor per segment or one stacked tensor ([L*n, K], [L*r, K],
// [L*n, r]); bias [L*n] or none; padded_bias [L*n + L*r] (the bias with zeros for the xa columns, or none:
// then with a bias the A rows do not ride along); diag [L, 1, L, 1] = diag(s_l) (in promote(B's dtype,
// float32)) when Z is built.  The Python caller decides and caches both (ops._xa_bias, ops._scale_diag).
// Returns the L segment outputs [..., n] (views of one [..., L*n(+L*r)] tensor) when split, else [y].
//
// Why C++: at the small shapes of SD cross-attention and ViT-B layers a GPU training step is bound by the
// host, and the Python autograd Function around these ~11 ATen calls costs more host time than the calls
// themselves.  The ATen calls and their order are exactly those of the Python Function (same results, bit
// for bit, tested); the inputs are checked by the Python caller (clora_fast.ops) before either runs.
// Device-generic: the same code runs on CPU and CUDA tensors.
#include <torch/extension.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <optional>
#include <vector>

namespace clora_fast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// s * a @ b, written into `out` when it is defined: a plain GEMM when s == 1, else the scale in the GEMM's
// epilogue (addmm with beta = 0 ignores its input).
Tensor mm_scaled(const Tensor& a, const Tensor& b, double s, Tensor out = Tensor()) {
  if (s == 1.0) {
    return out.defined() ? at::mm_out(out, a, b) : at::mm(a, b);
  }
  Tensor ignored = at::empty({}, a.options());
  return out.defined() ? at::addmm_out(out, ignored, a, b, 0.0, s) : at::addmm(ignored, a, b, 0.0, s);
}

// Segment l of `parts`: the l-th tensor, or rows [l*rows, (l+1)*rows) of the one stacked tensor.
Tensor segment(at::TensorList parts, int64_t L, int64_t rows, int64_t l) {
  return static_cast<int64_t>(parts.size()) == L ? parts[l] : parts[0].narrow(0, l * rows, rows);
}

// The gradients are not differentiable again: when backward runs with create_graph=True (grad mode on), they
// are computed without recording and handed back through a DelayedError node, so differentiating them raises
// this message instead of giving silently wrong second derivatives (clora_fast.ops._once_differentiable).
constexpr const char* kTwiceMsg =
    "clora_fast's ops are differentiable once: the gradients they return (their backward ran with "
    "create_graph=True) cannot be differentiated again (no double backward / gradgradcheck); "
    "compute second derivatives with the 'reference' formulas in plain PyTorch instead";

// Every gradient g becomes g + z, z an exact zero whose node raises kTwiceMsg and which hangs off `anchors` (the
// saved inputs and incoming gradients that require grad): differentiating a returned gradient with respect to
// anything it depends on reaches that node.  Called with grad mode on (create_graph=True).
variable_list poison(variable_list grads, const variable_list& anchors) {
  Tensor probe;
  for (const auto& t : anchors) {
    if (!t.defined() || !t.requires_grad() || t.numel() == 0) continue;
    Tensor one = t.reshape({-1}).narrow(0, 0, 1).sum().to(at::kFloat);
    probe = probe.defined() ? probe + one : one;
  }
  if (!probe.defined()) return grads;   // nothing the gradients depend on can be differentiated
  Tensor e = torch::autograd::DelayedError(kTwiceMsg, 1).apply({probe})[0];
  Tensor zero = at::nan_to_num(e - e.detach(), 0.0, 0.0, 0.0);
  for (auto& g : grads)
    if (g.defined()) g = g + zero.to(g.scalar_type());
  return grads;
}

// W_l + s_l B_l @ A_l into the row blocks of `out` (ops._fold_into): one batched GEMM when W, A and B are each
// stacked and the scales equal, else one GEMM per segment.  Bs may also be one [L, n, r] tensor: the diagonal
// blocks of Z (s_l B_l already, with scales 1).
void fold(const Tensor& out, at::TensorList Ws, at::TensorList As, at::TensorList Bs, const std::vector<double>& scales,
          int64_t n, int64_t r) {
  const int64_t L = static_cast<int64_t>(scales.size()), K = out.size(1);
  bool equal = true;
  for (double sc : scales) equal = equal && sc == scales[0];
  const int64_t nW = Ws.size(), nA = As.size(), nB = Bs.size();
  if (L > 1 && nW == 1 && nA == 1 && nB == 1 && equal) {
    Tensor w3 = out.narrow(0, 0, L * n).view({L, n, K});
    at::baddbmm_out(w3, Ws[0].reshape({L, n, K}), Bs[0].reshape({L, n, r}), As[0].reshape({L, r, K}), 1.0,
                    scales[0]);
    return;
  }
  for (int64_t l = 0; l < L; ++l) {
    Tensor o = out.narrow(0, l * n, n);
    Tensor bl = Bs[0].dim() == 3 ? Bs[0].select(0, l) : segment(Bs, L, n, l);
    at::addmm_out(o, segment(Ws, L, n, l), bl, segment(As, L, r, l), 1.0, scales[l]);
  }
}

struct MergedLoRA : public torch::autograd::Function<MergedLoRA> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, at::TensorList Ws, at::TensorList As,
                               at::TensorList Bs, const std::optional<Tensor>& bias,
                               const std::optional<Tensor>& padded_bias, const std::optional<Tensor>& diag,
                               std::vector<double> scales, bool split, bool grad_enabled) {
    ctx->set_materialize_grads(false);
    const int64_t L = static_cast<int64_t>(scales.size());
    const int64_t nW = Ws.size(), nA = As.size(), nB = Bs.size();
    const int64_t n = nW == L ? Ws[0].size(0) : Ws[0].size(0) / L;
    const int64_t r = nA == L ? As[0].size(0) : As[0].size(0) / L;
    const int64_t K = x.size(-1), Ln = L * n, Lr = L * r;
    bool b_trains = false, a_trains = false;
    for (const auto& b : Bs) b_trains = b_trains || b.requires_grad();
    for (const auto& a : As) a_trains = a_trains || a.requires_grad();
    const bool has_bias = bias.has_value() && bias->defined();
    const bool has_padded = padded_bias.has_value() && padded_bias->defined();
    const bool keep_xa = split && grad_enabled && b_trains && (!has_bias || has_padded);
    const bool ext = grad_enabled && x.requires_grad() && a_trains && nB == 1;
    TORCH_CHECK(!ext || (diag.has_value() && diag->defined()),
                "merged_lora: diag is needed (x and A trainable, B stacked)");

    Tensor w = at::empty({keep_xa ? Ln + Lr : Ln, ext ? K + Lr : K}, Ws[0].options());
    Tensor wk = ext ? w.narrow(1, 0, K) : w;
    std::optional<Tensor> b = has_bias ? bias : std::nullopt;
    if (keep_xa) {
      Tensor rows = wk.narrow(0, Ln, Lr);
      if (nA == 1) {
        rows.copy_(As[0]);
      } else {
        at::cat_out(rows, As, 0);
      }
      if (has_bias) b = *padded_bias;                     // the extra columns get no bias
    }
    Tensor z;
    if (ext) {        // Z = blockdiag(s_l B_l) beside W_eff
      z = w.narrow(0, 0, Ln).narrow(1, K, Lr).view({L, n, L, r});
      at::mul_out(z, Bs[0].reshape({L, n, 1, r}), *diag);
    }
    const auto dt = x.scalar_type();
    if (As[0].scalar_type() == dt && Bs[0].scalar_type() == dt) {
      fold(wk, Ws, As, Bs, scales, n, r);
    } else {          // float32 master factors: rounded to x's dtype where the writes above put them
      std::vector<Tensor> Ac;
      if (keep_xa) {
        Ac.push_back(wk.narrow(0, Ln, Lr));
      } else {
        for (const auto& a : As) Ac.push_back(a.to(dt));
      }
      if (ext) {      // s_l B_l: the diagonal blocks of Z
        std::vector<Tensor> Zb{z.diagonal(0, 0, 2).permute({2, 0, 1})};
        fold(wk, Ws, Ac, Zb, std::vector<double>(L, 1.0), n, r);
      } else {
        std::vector<Tensor> Bc;
        for (const auto& t : Bs) Bc.push_back(t.to(dt));
        fold(wk, Ws, Ac, Bc, scales, n, r);
      }
    }
    Tensor y = at::linear(x, wk, b);                      // [..., L*n (+ L*r)]

    variable_list to_save{x};
    to_save.insert(to_save.end(), Ws.begin(), Ws.end());
    to_save.insert(to_save.end(), As.begin(), As.end());
    to_save.insert(to_save.end(), Bs.begin(), Bs.end());
    ctx->save_for_backward(to_save);
    // W_eff (for dx) and xa (columns no output exposes) are kept as data: no version check, like the
    // Python Function's attributes
    if (grad_enabled && x.requires_grad()) ctx->saved_data["w"] = w.narrow(0, 0, Ln);   // [L*n, K (+ L*r)]
    if (keep_xa) ctx->saved_data["xa"] = y.narrow(-1, Ln, Lr);
    ctx->saved_data["scales"] = scales;
    ctx->saved_data["split"] = split;
    ctx->saved_data["dims"] = std::vector<int64_t>{nW, nA, nB, n, r, has_bias ? 1 : 0, ext ? 1 : 0};
    if (!split) return {y};
    std::vector<int64_t> sizes(L, n);
    if (keep_xa) sizes.push_back(Lr);
    auto parts = y.split_with_sizes(sizes, -1);
    parts.resize(L);
    return parts;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!at::GradMode::is_enabled()) return gradients(ctx, std::move(grads));
    variable_list anchors = ctx->get_saved_variables();       // x, Ws, As, Bs
    anchors.insert(anchors.end(), grads.begin(), grads.end());
    variable_list out;
    {
      at::NoGradGuard no_grad;
      out = gradients(ctx, std::move(grads));
    }
    return poison(std::move(out), anchors);
  }

  static variable_list gradients(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto scales = ctx->saved_data["scales"].toDoubleVector();
    const bool split = ctx->saved_data["split"].toBool();
    const auto dims = ctx->saved_data["dims"].toIntVector();
    const int64_t nW = dims[0], nA = dims[1], nB = dims[2], n = dims[3], r = dims[4];
    const bool has_bias = dims[5] != 0, ext = dims[6] != 0;
    const int64_t L = static_cast<int64_t>(scales.size()), Ln = L * n, Lr = L * r;
    Tensor x = saved[0];
    std::vector<Tensor> Ws(saved.begin() + 1, saved.begin() + 1 + nW);
    std::vector<Tensor> As(saved.begin() + 1 + nW, saved.begin() + 1 + nW + nA);
    std::vector<Tensor> Bs(saved.begin() + 1 + nW + nA, saved.end());
    // edges: x, Ws, As, Bs, bias (when given)
    auto need = [&](int64_t edge) { return ctx->needs_input_grad(edge); };
    bool need_a = false, need_b = false, need_w = false;
    for (int64_t i = 0; i < nW; ++i) need_w = need_w || need(1 + i);
    for (int64_t i = 0; i < nA; ++i) need_a = need_a || need(1 + nW + i);
    for (int64_t i = 0; i < nB; ++i) need_b = need_b || need(1 + nW + nA + i);
    const auto x_shape = x.sizes().vec();
    const int64_t K = x_shape.back();
    if (x.dim() != 2) x = x.reshape({-1, K});
    const int64_t M = x.size(0);

    std::vector<Tensor> dys(L);
    if (split) {
      for (int64_t l = 0; l < L; ++l)
        if (grads[l].defined()) dys[l] = grads[l].reshape({-1, n});
    } else if (grads[0].defined()) {
      auto pieces = grads[0].reshape({-1, Ln}).split(n, 1);
      for (int64_t l = 0; l < L; ++l) dys[l] = pieces[l];
    }

    Tensor dx, dbias, dA;
    std::vector<Tensor> gW(nW), gA(nA), gB(nB);
    if (need(0)) {
      Tensor w = ctx->saved_data["w"].toTensor();
      for (int64_t l = 0; l < L; ++l) {
        if (!dys[l].defined()) continue;
        Tensor wl = w.narrow(0, l * n, n);
        dx = dx.defined() ? dx.addmm_(dys[l], wl) : at::mm(dys[l], wl);
      }
      if (ext && dx.defined()) {                  // [dx | G^T]: G^T = [dy_l s_l B_l]_l  [M, L*r]
        dA = at::mm(dx.narrow(1, K, Lr).t(), x);                                // [L*r, K]
        dx = dx.narrow(1, 0, K);
      }
      dx = dx.defined() ? dx.view(x_shape) : at::zeros(x_shape, x.options());
    }
    if (need_a) {
      if (!dA.defined()) {
        Tensor G = at::empty({Lr, M}, x.options());
        std::vector<Tensor> Bc;                                // (float32 master factors: in x's dtype)
        for (const auto& t : Bs) Bc.push_back(t.to(x.scalar_type()));
        for (int64_t l = 0; l < L; ++l) {
          Tensor rows = G.narrow(0, l * r, r);
          if (!dys[l].defined()) {
            rows.zero_();
          } else {
            mm_scaled(segment(Bc, L, n, l).t(), dys[l].t(), scales[l], rows);   // s (dy B)^T  [r, M]
          }
        }
        dA = at::mm(G, x);                                                      // [L*r, K]
      }
      dA = dA.to(As[0].scalar_type());                    // (float32 master factors: their dtype)
      if (nA == 1) {
        gA[0] = dA;
      } else {
        for (int64_t l = 0; l < L; ++l)
          if (need(1 + nW + l)) gA[l] = dA.narrow(0, l * r, r);
      }
    }
    if (need_b) {
      Tensor xa;
      if (ctx->saved_data.count("xa")) {
        xa = ctx->saved_data["xa"].toTensor().reshape({M, Lr});
      } else if (nA == 1) {
        xa = at::mm(x, As[0].to(x.scalar_type()).t());                          // [M, L*r]
      }
      Tensor dB = nB == 1 ? at::empty({Ln, r}, x.options()) : Tensor();
      for (int64_t l = 0; l < L; ++l) {
        if (nB == L && !need(1 + nW + nA + l)) continue;
        Tensor out = dB.defined() ? dB.narrow(0, l * n, n) : Tensor();
        Tensor g;
        if (!dys[l].defined()) {
          g = out.defined() ? out.zero_() : at::zeros_like(Bs[l]);
        } else {
          Tensor xa_l = xa.defined() ? xa.narrow(1, l * r, r) : at::mm(x, As[l].to(x.scalar_type()).t());
          g = mm_scaled(dys[l].t(), xa_l, scales[l], out);                     // s dy^T (x A^T)  [n, r]
        }
        if (!dB.defined()) gB[l] = g.to(Bs[l].scalar_type());
      }
      if (dB.defined()) gB[0] = dB.to(Bs[0].scalar_type());
    }
    if (need_w) {
      std::vector<Tensor> dWs;
      for (int64_t l = 0; l < L; ++l)
        dWs.push_back(dys[l].defined() ? at::mm(dys[l].t(), x) : at::zeros({n, K}, x.options()));
      if (nW == 1) {
        gW[0] = at::cat(dWs);
      } else {
        gW = dWs;
      }
    }
    if (has_bias && need(1 + nW + nA + nB)) {
      const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      std::vector<Tensor> sums;
      for (int64_t l = 0; l < L; ++l)
        sums.push_back(dys[l].defined() ? dys[l].sum({0}, false, acc) : at::zeros({n}, x.options().dtype(acc)));
      dbias = at::cat(sums).to(x.scalar_type());
    }
    // one gradient per forward argument: x, each of Ws / As / Bs, bias, padded_bias, diag, scales, split,
    // grad_enabled
    variable_list out{dx};
    out.insert(out.end(), gW.begin(), gW.end());
    out.insert(out.end(), gA.begin(), gA.end());
    out.insert(out.end(), gB.begin(), gB.end());
    out.push_back(dbias);
    for (int i = 0; i < 5; ++i) out.push_back(Tensor());
    return out;
  }
};

}  // namespace

std::vector<Tensor> merged_lora(const Tensor& x, std::vector<Tensor> Ws, std::vector<Tensor> As,
                                std::vector<Tensor> Bs, const std::optional<Tensor>& bias,
                                const std::optional<Tensor>& padded_bias, const std::optional<Tensor>& diag,
                                std::vector<double> scales, bool split, bool grad_enabled) {
  TORCH_CHECK(!scales.empty() && !Ws.empty() && !As.empty() && !Bs.empty(),
              "merged_lora: scales, Ws, As and Bs must be non-empty (the Python caller checks the inputs)");
  return MergedLoRA::apply(x, at::TensorList(Ws), at::TensorList(As), at::TensorList(Bs), bias, padded_bias, diag,
                           scales, split, grad_enabled);
}

}  // namespace clora_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "clora_fast host-side C++ (autograd Functions that save Python overhead per call)";
  // merged_lora's calling convention; clora_fast.ops._MERGED_ABI must match (an extension built from older
  // sources is then not called with arguments it does not take)
  m.attr("MERGED_ABI") = 3;
  m.def("merged_lora", &clora_fast::merged_lora,
        "outs = merged_lora(x, Ws, As, Bs, bias, padded_bias, diag, scales, split, grad_enabled): the merged-weight "
        "LoRA projection as a C++ autograd Function (any device; see csrc/merged_lora.cpp)",
        pybind11::arg("x"), pybind11::arg("Ws"), pybind11::arg("As"), pybind11::arg("Bs"), pybind11::arg("bias"),
        pybind11::arg("padded_bias"), pybind11::arg("diag"), pybind11::arg("scales"), pybind11::arg("split"),
        pybind11::arg("grad_enabled"));
}
