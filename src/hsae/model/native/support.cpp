// A JumpReLU level's support on the CPU, fused: the entries of the pre-activations above
// theta - eps/2 (the active ones and the estimator's band), in row-major order, with their
// pre-activations and whether each is active (above theta); and the permutation sorting a
// level's entries by column. The library path (hsae.model.kernels.support_entries) takes a
// comparison over [tokens, features], a nonzero, index arithmetic, two gathers and a second
// comparison, then a radix sort, a bincount and a cumsum for the column order; here: two passes
// over the pre-activations (count, then write) and one counting sort.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

constexpr int64_t kBlock = 16;

// Bit t set where row[j0 + t] > cut[j0 + t], for the m <= 16 features from j0 (false for NaN,
// as the comparison is). A full block takes four SSE comparisons (x86-64's baseline).
inline uint32_t block_mask(const float* row, const float* cut, int64_t j0, int64_t m) {
  uint32_t mask = 0;
#if defined(__SSE2__)
  if (m == kBlock) {
    for (int q = 0; q < 4; ++q) {
      const __m128 a = _mm_loadu_ps(row + j0 + 4 * q), b = _mm_loadu_ps(cut + j0 + 4 * q);
      mask |= uint32_t(_mm_movemask_ps(_mm_cmpgt_ps(a, b))) << (4 * q);
    }
    return mask;
  }
#endif
  for (int64_t t = 0; t < m; ++t) mask |= uint32_t(row[j0 + t] > cut[j0 + t]) << t;
  return mask;
}

// Returns rows, cols (int64), pre_support (float) and active (bool) of the entries with
// pre > cut, row-major (as nonzero orders them).
std::vector<Tensor> support_entries(const Tensor& pre_t, const Tensor& cut_t,
                                    const Tensor& threshold_t) {
  TORCH_CHECK(pre_t.dim() == 2 && pre_t.scalar_type() == at::kFloat,
              "support entries: float32 [tokens, features] pre-activations");
  const Tensor pre = pre_t.contiguous(), cut_c = cut_t.contiguous();
  const Tensor threshold_c = threshold_t.contiguous();
  const int64_t n_tokens = pre.size(0), n = pre.size(1);
  TORCH_CHECK(cut_c.scalar_type() == at::kFloat && threshold_c.scalar_type() == at::kFloat &&
                  cut_c.numel() == n && threshold_c.numel() == n,
              "support entries: one float32 cut and threshold per feature");
  const float* p = pre.data_ptr<float>();
  const float* cut = cut_c.data_ptr<float>();
  const float* threshold = threshold_c.data_ptr<float>();
  std::vector<int64_t> start(n_tokens + 1, 0);
  at::parallel_for(0, n_tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = p + r * n;
      int64_t count = 0;
      for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
        count += __builtin_popcount(block_mask(row, cut, j0, std::min(kBlock, n - j0)));
      }
      start[r + 1] = count;
    }
  });
  for (int64_t r = 0; r < n_tokens; ++r) start[r + 1] += start[r];
  const int64_t total = start[n_tokens];
  auto long_options = at::TensorOptions().dtype(at::kLong);
  Tensor rows_t = at::empty({total}, long_options);
  Tensor cols_t = at::empty({total}, long_options);
  Tensor values_t = at::empty({total}, at::TensorOptions().dtype(at::kFloat));
  Tensor active_t = at::empty({total}, at::TensorOptions().dtype(at::kBool));
  int64_t* rows = rows_t.data_ptr<int64_t>();
  int64_t* cols = cols_t.data_ptr<int64_t>();
  float* values = values_t.data_ptr<float>();
  bool* active = active_t.data_ptr<bool>();
  at::parallel_for(0, n_tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = p + r * n;
      int64_t k = start[r];
      for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
        uint32_t mask = block_mask(row, cut, j0, std::min(kBlock, n - j0));
        while (mask) {
          const int64_t j = j0 + __builtin_ctz(mask);
          mask &= mask - 1;
          rows[k] = r;
          cols[k] = j;
          values[k] = row[j];
          active[k] = row[j] > threshold[j];
          ++k;
        }
      }
    }
  });
  return {rows_t, cols_t, values_t, active_t};
}

// The stable permutation sorting `cols` (int64, in [0, n_columns)) and where each column starts
// in it (int64 [n_columns]): a counting sort.
std::vector<Tensor> column_order(const Tensor& cols_t, int64_t n_columns) {
  TORCH_CHECK(cols_t.scalar_type() == at::kLong && cols_t.dim() == 1,
              "column order: int64 columns");
  const Tensor cols_c = cols_t.contiguous();
  const int64_t n = cols_c.numel();
  const int64_t* cols = cols_c.data_ptr<int64_t>();
  auto long_options = at::TensorOptions().dtype(at::kLong);
  Tensor starts_t = at::zeros({n_columns}, long_options);
  int64_t* starts = starts_t.data_ptr<int64_t>();
  bool valid = true;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t c = cols[k];
    const bool ok = (c >= 0) & (c < n_columns);
    valid &= ok;
    starts[ok ? c : 0] += ok;
  }
  TORCH_CHECK(valid, "column order: columns must lie in [0, ", n_columns, ")");
  int64_t running = 0;
  for (int64_t c = 0; c < n_columns; ++c) {
    const int64_t count = starts[c];
    starts[c] = running;
    running += count;
  }
  std::vector<int64_t> cursor(starts, starts + n_columns);
  Tensor order_t = at::empty({n}, long_options);
  int64_t* order = order_t.data_ptr<int64_t>();
  for (int64_t k = 0; k < n; ++k) order[cursor[cols[k]]++] = k;
  return {order_t, starts_t};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hsae_native, m) {
  m.def("support_entries(Tensor pre, Tensor cut, Tensor threshold) -> Tensor[]");
  m.def("column_order(Tensor cols, int n_columns) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hsae_native, CPU, m) {
  m.impl("support_entries", &support_entries);
  m.impl("column_order", &column_order);
}
