// Decoding support entries against a decoder too large for a core's L2 cache, on the CPU: the
// forward sum over each token's entries of value * decoder row, and the backward per-entry dot
// of the token's output gradient with the entry's decoder row (with, for a perturbed parent
// level's borrowed children among the entries, their dots with its reconstruction's gradient,
// and their decoder rows' share, in a pass of their own: kernels.BorrowedBackward). The library
// kernels (embedding_bag and its per-sample-weight gradient) visit the entries in order, so at
// 2,048 x 640 (5 MiB) most decoder rows come from L3 or memory; here each thread walks its
// tokens once per block of `chunk` decoder rows (sized to stay in L2) and takes only the entries
// whose feature lies in that block: 1.5 against 2.3 ms forward and 1.5 against 2.7 ms for the
// dots at 2,048 latents x 1,024 tokens on two threads.
//
// Entries: values (float), rows (int64, ascending: the tokens) and cols (int64, in [0, n)).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

#include "row_kernels.h"

namespace {

using at::Tensor;
using hsae_native::row_axpy;
using hsae_native::row_dot;

// Where each token's entries start (checking rows and cols first); `ascending`: whether each
// token's columns ascend (as nonzero's do), so that a block's entries are a run of them.
std::vector<int64_t> token_starts(const Tensor& rows, const Tensor& cols, int64_t n_tokens,
                                  int64_t n_features, const char* what, bool& ascending) {
  TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong &&
                  rows.is_contiguous() && cols.is_contiguous() && rows.numel() == cols.numel(),
              what, ": contiguous int64 rows and cols of one length");
  const int64_t n = rows.numel();
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* c = cols.data_ptr<int64_t>();
  std::atomic<bool> valid{true}, sorted{true};
  at::parallel_for(0, n, 8192, [&](int64_t begin, int64_t end) {
    bool ok = true, in_order = true;
    for (int64_t i = begin; i < end; ++i) {
      ok &= (r[i] >= 0) & (r[i] < n_tokens) & (c[i] >= 0) & (c[i] < n_features) &
            (i == 0 || r[i] >= r[i - 1]);
      in_order &= i == 0 || r[i] != r[i - 1] || c[i] > c[i - 1];
    }
    if (!ok) valid = false;
    if (!in_order) sorted = false;
  });
  ascending = sorted.load();
  TORCH_CHECK(valid.load(), what, ": the entries need rows in [0, ", n_tokens,
              ") in ascending order and columns in [0, ", n_features, ")");
  std::vector<int64_t> start(n_tokens + 1);
  for (int64_t t = 0; t <= n_tokens; ++t) start[t] = std::lower_bound(r, r + n, t) - r;
  return start;
}

// Calls visit(t, k) for every entry k of tokens [begin, end), block of decoder rows by block:
// with ascending columns each token keeps a cursor into its entries; otherwise every block
// scans them all.
template <typename Visit>
void by_blocks(const std::vector<int64_t>& start, const int64_t* col, bool ascending,
               int64_t n, int64_t chunk, int64_t begin, int64_t end, Visit visit) {
  if (ascending) {
    std::vector<int64_t> cursor(start.begin() + begin, start.begin() + end);
    for (int64_t lo = 0; lo < n; lo += chunk) {
      const int64_t hi = lo + chunk;
      for (int64_t t = begin; t < end; ++t) {
        int64_t k = cursor[t - begin];
        for (; k < start[t + 1] && col[k] < hi; ++k) visit(t, k);
        cursor[t - begin] = k;
      }
    }
    return;
  }
  for (int64_t lo = 0; lo < n; lo += chunk) {
    const int64_t hi = lo + chunk;
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t k = start[t]; k < start[t + 1]; ++k) {
        if (col[k] >= lo && col[k] < hi) visit(t, k);
      }
    }
  }
}

void check_decoder(const Tensor& decoder, int64_t chunk, const char* what) {
  TORCH_CHECK(decoder.scalar_type() == at::kFloat && decoder.dim() == 2 && decoder.is_contiguous(),
              what, ": a contiguous float32 [features, d] decoder");
  TORCH_CHECK(chunk > 0, what, ": the block of decoder rows must be positive");
}

// The decoder rows whose entries a perturbed parent level borrows (its substituted parents'
// children): a bool flag per row, or none.
const bool* borrowed_flags(const std::optional<Tensor>& borrowed, int64_t n, const char* what) {
  if (!borrowed.has_value()) return nullptr;
  TORCH_CHECK(borrowed->scalar_type() == at::kBool && borrowed->is_contiguous() &&
                  borrowed->numel() == n,
              what, ": one contiguous bool borrowed flag per decoder row");
  return borrowed->data_ptr<bool>();
}

// [n_tokens, d]: per token, the sum of value * decoder[col] over its entries.
Tensor tiled_decode(const Tensor& values_t, const Tensor& rows_t, const Tensor& cols_t,
                    const Tensor& decoder, int64_t n_tokens, int64_t chunk) {
  check_decoder(decoder, chunk, "tiled decode");
  const Tensor values = values_t.contiguous(), rows = rows_t.contiguous();
  const Tensor cols = cols_t.contiguous();
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.numel() == rows.numel(),
              "tiled decode: one float32 value per entry");
  const int64_t n = decoder.size(0), d = decoder.size(1);
  bool ascending = false;
  const auto start = token_starts(rows, cols, n_tokens, n, "tiled decode", ascending);
  const float* value = values.data_ptr<float>();
  const int64_t* col = cols.data_ptr<int64_t>();
  const float* weight = decoder.data_ptr<float>();
  Tensor out = at::zeros({n_tokens, d}, values.options());
  float* output = out.data_ptr<float>();
  at::parallel_for(0, n_tokens, 16, [&](int64_t begin, int64_t end) {
    by_blocks(start, col, ascending, n, chunk, begin, end, [&](int64_t t, int64_t k) {
      row_axpy(output + t * d, value[k], weight + col[k] * d, d);
    });
  });
  return out;
}

// [entries]: <grad[row], decoder[col]> of each entry (with `kept`, a bool per entry: 0 for the
// entries it does not keep, whose values a perturbed level's own decode zeroed); with
// `borrowed`, a second [entries]: <borrowed_grad[row], decoder[col]> for the entries whose
// column is flagged (the gradient of their share in the parent level's perturbed
// reconstruction), 0 for the others. `merge`: the two summed into the first (both outputs'
// values being the same entries' values), the second empty. With `borrowed` and `values` (the
// borrowed entries' values), also the borrowed features (int64, ascending) and their decoder
// rows' share of the gradient ([features, d]: the sum of value * borrowed_grad[row] over their
// entries), empty without `values`.
std::vector<Tensor> entry_dots(const Tensor& grad_t, const Tensor& rows_t, const Tensor& cols_t,
                               const Tensor& decoder, int64_t chunk,
                               const std::optional<Tensor>& borrowed_grad_t,
                               const std::optional<Tensor>& borrowed_t,
                               const std::optional<Tensor>& kept_t, bool merge,
                               const std::optional<Tensor>& values_t = std::nullopt) {
  check_decoder(decoder, chunk, "tiled dots");
  const Tensor grad = grad_t.contiguous(), rows = rows_t.contiguous();
  const Tensor cols = cols_t.contiguous();
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.dim() == 2 &&
                  grad.size(1) == decoder.size(1),
              "tiled dots: a float32 [tokens, d] gradient");
  TORCH_CHECK(borrowed_t.has_value() == borrowed_grad_t.has_value(),
              "tiled dots: the borrowed flags and their output's gradient go together");
  const int64_t n = decoder.size(0), d = decoder.size(1), n_tokens = grad.size(0);
  const bool* borrowed = borrowed_flags(borrowed_t, n, "tiled dots");
  Tensor borrowed_grad;
  if (borrowed) {
    borrowed_grad = borrowed_grad_t->contiguous();
    TORCH_CHECK(
        borrowed_grad.scalar_type() == at::kFloat && borrowed_grad.sizes() == grad.sizes(),
        "tiled dots: the borrowed output's gradient is a float32 [tokens, d] like grad");
  }
  TORCH_CHECK(!merge || borrowed, "tiled dots: merging needs the borrowed flags");
  const bool* kept = nullptr;
  if (kept_t.has_value()) {
    TORCH_CHECK(kept_t->scalar_type() == at::kBool && kept_t->is_contiguous() &&
                    kept_t->numel() == rows.numel(),
                "tiled dots: one contiguous bool kept flag per entry");
    kept = kept_t->data_ptr<bool>();
  }
  bool ascending = false;
  const auto start = token_starts(rows, cols, n_tokens, n, "tiled dots", ascending);
  const int64_t* col = cols.data_ptr<int64_t>();
  const float* weight = decoder.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const float* borrowed_g = borrowed ? borrowed_grad.data_ptr<float>() : nullptr;
  Tensor out = at::empty({rows.numel()}, grad.options());
  Tensor borrowed_out = at::zeros({borrowed && !merge ? rows.numel() : 0}, grad.options());
  float* dots = out.data_ptr<float>();
  float* borrowed_dots = merge ? dots : borrowed_out.data_ptr<float>();
  at::parallel_for(0, n_tokens, 16, [&](int64_t begin, int64_t end) {
    by_blocks(start, col, ascending, n, chunk, begin, end, [&](int64_t t, int64_t k) {
      dots[k] = !kept || kept[k] ? row_dot(g + t * d, weight + col[k] * d, d) : 0.0f;
    });
  });
  if (!borrowed) return {out, borrowed_out};
  // The borrowed entries, in entry order (so by token), picked in fixed blocks joined in order.
  const int64_t n_entries = rows.numel();
  const int64_t n_blocks = std::min<int64_t>(64, std::max<int64_t>(1, n_entries / 2048));
  std::vector<std::vector<int64_t>> block_picked(n_blocks);
  at::parallel_for(0, n_blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      for (int64_t k = b * n_entries / n_blocks; k < (b + 1) * n_entries / n_blocks; ++k) {
        if (borrowed[col[k]]) block_picked[b].push_back(k);
      }
    }
  });
  std::vector<int64_t> picked;
  for (const auto& mine : block_picked) picked.insert(picked.end(), mine.begin(), mine.end());
  // Each borrowed feature's slot among them (ascending), and the threads' shares of the slots:
  // one thread takes all the entries of a feature, in token order.
  std::vector<int32_t> slot(n, -1);
  int64_t n_slots = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (borrowed[j]) slot[j] = static_cast<int32_t>(n_slots++);
  }
  const float* value = nullptr;
  if (values_t.has_value()) {
    TORCH_CHECK(values_t->scalar_type() == at::kFloat && values_t->is_contiguous() &&
                    values_t->numel() == n_entries,
                "tiled dots: one contiguous float32 borrowed value per entry");
    value = values_t->data_ptr<float>();
  }
  Tensor latents = at::empty({value ? n_slots : 0}, rows.options());
  Tensor rows_grad = at::zeros({value ? n_slots : 0, d}, grad.options());
  if (value) {
    int64_t* latent = latents.data_ptr<int64_t>();
    for (int64_t j = 0; j < n; ++j) {
      if (slot[j] >= 0) latent[slot[j]] = j;
    }
  }
  float* row_grad = rows_grad.data_ptr<float>();
  const int64_t* token = rows.data_ptr<int64_t>();
  const int64_t n_picked = static_cast<int64_t>(picked.size());
  // The borrowed entries' dots (and rows) in a pass of their own, in token order: their few
  // decoder rows stay in L2 and the borrowed gradient's rows stream in order, where in the
  // blocks' visit each token's row came from L3 (at d = 640 on two threads, 0.27-0.38 against
  // 0.44-0.60 ms over the plain dots at 2,048 latents, 0.29 against 0.36 at 512); each row of
  // the borrowed gradient is read once for the dot and the rows' share alike.
  at::parallel_for(0, n_slots, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = 0; i < n_picked; ++i) {
      const int64_t k = picked[i];
      const int64_t s = slot[col[k]];
      if (s < lo || s >= hi) continue;
      const float* b = borrowed_g + token[k] * d;
      const float dot = row_dot(b, weight + col[k] * d, d);
      borrowed_dots[k] = merge ? dots[k] + dot : dot;
      if (value) row_axpy(row_grad + s * d, value[k], b, d);
    }
  });
  return {out, borrowed_out, latents, rows_grad};
}

Tensor tiled_dots(const Tensor& grad, const Tensor& rows, const Tensor& cols,
                  const Tensor& decoder, int64_t chunk, const std::optional<Tensor>& kept) {
  return entry_dots(grad, rows, cols, decoder, chunk, std::nullopt, std::nullopt, kept, false)[0];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hsae_native, m) {
  m.def(
      "tiled_decode(Tensor values, Tensor rows, Tensor cols, Tensor decoder, int n_tokens, "
      "int chunk) -> Tensor");
  m.def(
      "tiled_dots(Tensor grad, Tensor rows, Tensor cols, Tensor decoder, int chunk, "
      "Tensor? kept=None) -> Tensor");
  m.def(
      "tiled_dots_borrowed(Tensor grad, Tensor rows, Tensor cols, Tensor decoder, int chunk, "
      "Tensor borrowed_grad, Tensor borrowed, Tensor? kept=None, bool merge=False, "
      "Tensor? values=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hsae_native, CPU, m) {
  m.impl("tiled_decode", &tiled_decode);
  m.impl("tiled_dots", &tiled_dots);
  m.impl("tiled_dots_borrowed", [](const Tensor& grad, const Tensor& rows, const Tensor& cols,
                                    const Tensor& decoder, int64_t chunk,
                                    const Tensor& borrowed_grad, const Tensor& borrowed,
                                    const std::optional<Tensor>& kept, bool merge,
                                    const std::optional<Tensor>& values) {
    return entry_dots(grad, rows, cols, decoder, chunk, borrowed_grad, borrowed, kept, merge,
                      values);
  });
}
