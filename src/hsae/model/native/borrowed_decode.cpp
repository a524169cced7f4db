// The perturbation's borrowed children on the CPU, fused: a perturbed level's reconstruction
// adds, for every child entry whose feature's parent is substituted this step, value * the
// child's decoder row into the entry's token (hsae.model.hierarchy_losses.
// perturbed_reconstruction). The library path selects those entries (a mask, a host sync, a
// nonzero, three gathers), decodes them with embedding_bag and, backward, takes per-entry dot
// products and a sparse decoder gradient over the borrowed rows: some 50 small kernels a level
// for a few thousand entries. Here: one pass over the child entries forward, one over the
// borrowed ones backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <vector>

#include "row_kernels.h"

namespace {

using at::Tensor;
using hsae_native::row_axpy;
using hsae_native::row_dot;
using hsae_native::row_prefetch;

// Adds the borrowed entries' outputs into `out` ([tokens, d], in place) and returns the
// borrowed entries' indices (int64, in entry order, so by token): the entries whose feature
// is flagged in `borrowed` ([child features] bool).
Tensor borrowed_decode_forward(
    const Tensor& values_t, const Tensor& rows_t, const Tensor& cols_t, const Tensor& borrowed_t,
    const Tensor& decoder_t, Tensor& out) {
  TORCH_CHECK(values_t.scalar_type() == at::kFloat && decoder_t.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat,
              "borrowed decode: float32 values, decoder and output");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && decoder_t.dim() == 2 &&
                  out.size(1) == decoder_t.size(1),
              "borrowed decode: a contiguous [tokens, d] output and a [features, d] decoder");
  const Tensor values = values_t.contiguous(), rows = rows_t.contiguous();
  const Tensor cols = cols_t.contiguous(), flags = borrowed_t.contiguous().to(at::kBool);
  const Tensor decoder = decoder_t.stride(1) == 1 ? decoder_t : decoder_t.contiguous();
  TORCH_CHECK(flags.numel() == decoder.size(0), "borrowed decode: one flag per child feature");
  const int64_t n = values.numel(), d = decoder.size(1), n_tokens = out.size(0);
  const int64_t n_features = decoder.size(0), stride = decoder.stride(0);
  const float* value = values.data_ptr<float>();
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* col = cols.data_ptr<int64_t>();
  const bool* flag = flags.data_ptr<bool>();
  // Checked and picked in parallel, in fixed blocks whose lists are joined in order.
  const int64_t n_blocks = std::min<int64_t>(64, std::max<int64_t>(1, n / 2048));
  std::vector<std::vector<int64_t>> block_picked(n_blocks);
  std::atomic<bool> valid{true};
  at::parallel_for(0, n_blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t first = b * n / n_blocks, last = (b + 1) * n / n_blocks;
      bool good = true;
      std::vector<int64_t>& mine = block_picked[b];
      for (int64_t i = first; i < last; ++i) {
        const bool ok = (row[i] >= 0) & (row[i] < n_tokens) & (col[i] >= 0) &
                        (col[i] < n_features) & (i == 0 || row[i] >= row[i - 1]);
        good &= ok;
        if (ok && flag[col[i]]) mine.push_back(i);
      }
      if (!good) valid = false;
    }
  });
  TORCH_CHECK(valid.load(), "borrowed decode: the entries need rows in [0, ", n_tokens,
              ") in ascending order and columns in [0, ", n_features, ")");
  std::vector<int64_t> picked;
  for (const auto& mine : block_picked) picked.insert(picked.end(), mine.begin(), mine.end());
  const int64_t k = static_cast<int64_t>(picked.size());
  // Threads take runs of whole tokens, so no two write the same output row.
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < k; ++i) {
    if (i == 0 || row[picked[i]] != row[picked[i - 1]]) starts.push_back(i);
  }
  starts.push_back(k);
  const float* base = decoder.data_ptr<float>();
  float* output = out.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(starts.size()) - 1, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; ++g) {
      for (int64_t i = starts[g]; i < starts[g + 1]; ++i) {
        const int64_t e = picked[i];
        if (i + 1 < k) row_prefetch(base + col[picked[i + 1]] * stride, d);
        row_axpy(output + row[e] * d, value[e], base + col[e] * stride, d);
      }
    }
  });
  Tensor entries = at::empty({k}, at::TensorOptions().dtype(at::kLong));
  std::copy(picked.begin(), picked.end(), entries.data_ptr<int64_t>());
  return entries;
}

// Backward: the gradient of every child entry's value ([entries], zero for those not
// borrowed: <grad_out[row], W_dec[col]>), the borrowed features (int64, ascending) and their
// decoder rows' gradient ([features, d]: the sum of value * grad_out[row] over their entries).
std::vector<Tensor> borrowed_decode_backward(
    const Tensor& grad_t, const Tensor& values_t, const Tensor& rows_t, const Tensor& cols_t,
    const Tensor& entries_t, const Tensor& decoder_t, bool need_values, bool need_decoder) {
  const Tensor grad = grad_t.contiguous(), values = values_t.contiguous();
  const Tensor rows = rows_t.contiguous(), cols = cols_t.contiguous();
  const Tensor decoder = decoder_t.stride(1) == 1 ? decoder_t : decoder_t.contiguous();
  const int64_t n = values.numel(), d = decoder.size(1), k = entries_t.numel();
  const int64_t stride = decoder.stride(0);
  const float* value = values.data_ptr<float>();
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* col = cols.data_ptr<int64_t>();
  const int64_t* entry = entries_t.data_ptr<int64_t>();
  const float* g = grad.data_ptr<float>();
  const float* base = decoder.data_ptr<float>();
  std::vector<Tensor> out;
  Tensor grad_values = at::zeros({need_values ? n : 0}, values.options());
  if (need_values) {
    float* target = grad_values.data_ptr<float>();
    at::parallel_for(0, k, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t e = entry[i];
        target[e] = row_dot(g + row[e] * d, base + col[e] * stride, d);
      }
    });
  }
  out.push_back(grad_values);
  if (!need_decoder) {
    out.push_back(at::empty({0}, at::TensorOptions().dtype(at::kLong)));
    out.push_back(at::empty({0, d}, values.options()));
    return out;
  }
  // The borrowed entries grouped by feature (sorted, stable: by token within a feature).
  std::vector<int64_t> order(k);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t i, int64_t j) { return col[entry[i]] < col[entry[j]]; });
  std::vector<int64_t> latents, group_start;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t c = col[entry[order[i]]];
    if (latents.empty() || latents.back() != c) {
      latents.push_back(c);
      group_start.push_back(i);
    }
  }
  group_start.push_back(k);
  const int64_t m = static_cast<int64_t>(latents.size());
  Tensor latents_t = at::empty({m}, at::TensorOptions().dtype(at::kLong));
  std::copy(latents.begin(), latents.end(), latents_t.data_ptr<int64_t>());
  Tensor rows_grad = at::zeros({m, d}, values.options());
  float* target = rows_grad.data_ptr<float>();
  at::parallel_for(0, m, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t f = lo; f < hi; ++f) {
      float* t = target + f * d;
      for (int64_t i = group_start[f]; i < group_start[f + 1]; ++i) {
        const int64_t e = entry[order[i]];
        row_axpy(t, value[e], g + row[e] * d, d);
      }
    }
  });
  out.push_back(latents_t);
  out.push_back(rows_grad);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hsae_native, m) {
  m.def(
      "borrowed_decode_forward(Tensor values, Tensor rows, Tensor cols, Tensor borrowed, "
      "Tensor decoder, Tensor(a!) out) -> Tensor");
  m.def(
      "borrowed_decode_backward(Tensor grad, Tensor values, Tensor rows, Tensor cols, "
      "Tensor entries, Tensor decoder, bool need_values, bool need_decoder) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hsae_native, CPU, m) {
  m.impl("borrowed_decode_forward", &borrowed_decode_forward);
  m.impl("borrowed_decode_backward", &borrowed_decode_backward);
}
