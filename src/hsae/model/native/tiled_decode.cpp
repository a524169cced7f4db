// Decoding support entries against a decoder too large for a core's L2 cache, on the CPU: the
// forward sum over each token's entries of value * decoder row, and the backward per-entry dot
// of the token's output gradient with the entry's decoder row (with, for a perturbed parent
// level's borrowed children among the entries, their dots with its reconstruction's gradient,
// and their decoder rows' share: kernels.BorrowedBackward). The library kernels
// (embedding_bag and its per-sample-weight gradient) visit the entries in order, so at
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
using hsae_native::row_prefetch;

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
// values being the same entries' values), the second empty.
std::vector<Tensor> entry_dots(const Tensor& grad_t, const Tensor& rows_t, const Tensor& cols_t,
                               const Tensor& decoder, int64_t chunk,
                               const std::optional<Tensor>& borrowed_grad_t,
                               const std::optional<Tensor>& borrowed_t,
                               const std::optional<Tensor>& kept_t, bool merge) {
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
  if (borrowed) {
    // The borrowed entries' dots in a pass of their own, token by token: their few decoder rows
    // stay in L2 and the borrowed gradient's rows stream in order, where in the blocks' visit
    // each token's row came from L3 (at d = 640 on two threads, 0.27-0.38 against 0.44-0.60 ms
    // over the plain dots at 2,048 latents, 0.29 against 0.36 at 512).
    at::parallel_for(0, n_tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t k = start[t]; k < start[t + 1]; ++k) {
          if (!borrowed[col[k]]) continue;
          const float dot = row_dot(borrowed_g + t * d, weight + col[k] * d, d);
          borrowed_dots[k] = merge ? dots[k] + dot : dot;
        }
      }
    });
  }
  return {out, borrowed_out};
}

Tensor tiled_dots(const Tensor& grad, const Tensor& rows, const Tensor& cols,
                  const Tensor& decoder, int64_t chunk, const std::optional<Tensor>& kept) {
  return entry_dots(grad, rows, cols, decoder, chunk, std::nullopt, std::nullopt, kept, false)[0];
}

// Adds into a child level's decoder gradient `out` ([n, d], contiguous) what the borrowed
// children's outputs in the parent level's reconstruction contribute: row j of a borrowed
// feature += the sum of value * borrowed_grad[row] over the feature's entries, read through the
// entries' column order (`order`, and each column's first position in it, `starts`;
// kernels.column_order's). The other rows stay as they are.
void borrowed_rows(Tensor& out, const Tensor& borrowed_values, const Tensor& rows_t,
                   const Tensor& order_t, const Tensor& starts_t, const Tensor& borrowed_t,
                   const Tensor& borrowed_grad_t) {
  const int64_t n = out.size(0), d = out.size(1), n_entries = borrowed_values.numel();
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2,
              "borrowed rows: a contiguous float32 [n, d] gradient");
  TORCH_CHECK(borrowed_values.scalar_type() == at::kFloat && borrowed_values.is_contiguous(),
              "borrowed rows: contiguous float32 values");
  const bool* borrowed = borrowed_flags(borrowed_t, n, "borrowed rows");
  const Tensor rows = rows_t.contiguous(), order = order_t.contiguous();
  const Tensor starts = starts_t.contiguous(), borrowed_grad = borrowed_grad_t.contiguous();
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.numel() == n_entries &&
                  order.scalar_type() == at::kLong && order.numel() == n_entries &&
                  starts.scalar_type() == at::kLong && starts.numel() == n,
              "borrowed rows: int64 rows and order, one per entry, and a start per column");
  TORCH_CHECK(borrowed_grad.scalar_type() == at::kFloat && borrowed_grad.dim() == 2 &&
                  borrowed_grad.size(1) == d,
              "borrowed rows: a float32 [tokens, d] gradient of the borrowed output");
  const int64_t n_tokens = borrowed_grad.size(0);
  const float* value = borrowed_values.data_ptr<float>();
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* position = order.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  const float* g = borrowed_grad.data_ptr<float>();
  float* target = out.data_ptr<float>();
  std::atomic<bool> valid{true};
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    bool ok = true;
    for (int64_t j = begin; j < end; ++j) {
      if (!borrowed[j]) continue;
      const int64_t lo = start[j], hi = j + 1 < n ? start[j + 1] : n_entries;
      ok &= (lo >= 0) & (lo <= hi) & (hi <= n_entries);
      if (!ok) break;
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t k = position[i];
        const bool good = (k >= 0) & (k < n_entries) && (row[k] >= 0) & (row[k] < n_tokens);
        ok &= good;
        if (!good) continue;
        if (i + 1 < hi) {  // the next entry's token row, while this one's is added
          const int64_t next = position[i + 1];
          if ((next >= 0) & (next < n_entries)) row_prefetch(g + row[next] * d, d);
        }
        row_axpy(target + j * d, value[k], g + row[k] * d, d);
      }
    }
    if (!ok) valid = false;
  });
  TORCH_CHECK(valid.load(), "borrowed rows: the column order does not match the entries");
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
      "Tensor borrowed_grad, Tensor borrowed, Tensor? kept=None, bool merge=False) -> Tensor[]");
  m.def(
      "borrowed_rows(Tensor(a!) out, Tensor borrowed_values, Tensor rows, Tensor order, "
      "Tensor starts, Tensor borrowed, Tensor borrowed_grad) -> ()");
}

TORCH_LIBRARY_IMPL(hsae_native, CPU, m) {
  m.impl("tiled_decode", &tiled_decode);
  m.impl("tiled_dots", &tiled_dots);
  m.impl("tiled_dots_borrowed", [](const Tensor& grad, const Tensor& rows, const Tensor& cols,
                                    const Tensor& decoder, int64_t chunk,
                                    const Tensor& borrowed_grad, const Tensor& borrowed,
                                    const std::optional<Tensor>& kept, bool merge) {
    return entry_dots(grad, rows, cols, decoder, chunk, borrowed_grad, borrowed, kept, merge);
  });
  m.impl("borrowed_rows", &borrowed_rows);
}
