// gradfilter_cpp::outer_sq_norms -- per-example squared Frobenius norms of
// outer-product gradients over packed rows, on the CPU.
//
// Rows are packed: left [N, a], right [N, b], cu_seqlens [B + 1] (int64 or
// int32, cu[0] = 0, non-decreasing, cu[B] = N).  Example i owns the rows
// cu[i] : cu[i + 1] (possibly none) and its gradient is
//
//     G_i = sum_{t in i} left[t] (x) right[t] = L_i^T R_i          [a, b]
//
// The op returns ||G_i||_F^2 for every example, shape [B], without holding the
// gradients of the whole batch:
//
//   route "direct": G_i is cut into tiles of at most 64 x 64 elements (or, for
//     thin gradients, fewer rows and more columns: see plan_direct); one work
//     item accumulates one tile over all of the example's rows and square-sums
//     it.  About 2 n a b FLOPs per example.  ||L^T R|| = ||R^T L||, so the narrower factor
//     always takes the tile's row axis and the wider one the vectorised column
//     axis (LoRA: one width is the rank, 1..64, the other the hidden size).
//   route "ghost" (alias "gram"): ||L^T R||^2 = <L L^T, R R^T>
//     = sum_{t,s} (L_t . L_s)(R_t . R_s).  The n x n row-pair space is cut into
//     64 x 64 blocks (p, q), p <= q; one work item forms both Gram blocks and
//     sums their elementwise product, counted twice off the diagonal (both Gram
//     matrices are symmetric).  About 2 n^2 (a + b) FLOPs per example.
//
// Both routes reduce to one kernel, C[p][q] += sum_k U[k][p] * V[k][q], run
// on the input rows in place (direct route, thin float32 / float64 tiles) or on
// staged copies (row chunks for "direct", transposed feature chunks for
// "ghost"); staging also converts float16 / bfloat16 to float32.  Work items
// are spread over OpenMP threads (torch's intra-op thread count); each writes
// its own partial sum and the partials are added per example in item order,
// so the result depends neither on the schedule nor on the thread count.
//
// Numerics: products are accumulated in float32 (float64 for float64 input),
// tile sums and the per-example total in float64; the output is float32
// (float64 for float64 input).  Rounding therefore grows with the number of
// rows of an example (direct) or with a and b (ghost), like any float32
// GEMM.  On x86-64 Linux/GCC the hot functions are also compiled for
// x86-64-v3 (AVX2 + FMA) and chosen at load time; the FMA clone rounds
// differently from the baseline clone, so results can differ in the last bits
// between machines but are identical from run to run on one machine.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if !defined(__GNUC__)
#error "outer_sq_norms.cpp needs GCC or Clang (it uses GNU vector extensions)"
#endif

#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define GF_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GF_HOT
#endif
#define GF_INLINE inline __attribute__((always_inline))

namespace {

// Ghost route: edge of a Gram block (rows x rows).  Direct route: edge of a
// staged tile of G, and the most rows of any tile.
constexpr int64_t kTile = 64;
// Accumulator elements per tile (16 KiB in float32, about half an L1 cache).
constexpr int64_t kTileElems = kTile * kTile;
// Rows (direct) or features (ghost) staged per step.
constexpr int64_t kChunk = 64;
// Direct route, in place: rows per step.  Each register block's accumulators
// are loaded and stored once per step, so a step should be a few times the
// multiply-add latency; short steps keep the rows a step touches in L1.
constexpr int64_t kRowStep = 16;
// Direct route: tiles with at most this many rows are read in place (float32
// and float64).  Wider tiles are staged: their column strips are re-read by
// many register blocks, and read in place, rows whose stride is a multiple of
// 4 KiB (hidden sizes 1024, 2048, 4096) evict each other from L1.
constexpr int64_t kInPlaceMaxRows = 16;
// Register block: kMR tile rows x 2 vectors of tile columns.
constexpr int kMR = 4;
// Below this many multiply-adds in total the op runs on one thread.
constexpr int64_t kParallelMinWork = int64_t(1) << 18;

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int width = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int width = 4;
};

// Columns of C updated by one register block; staged widths are rounded up to
// a multiple of it (the extra columns are staged as zeros).
template <typename T>
constexpr int64_t kNR = 2 * Vec<T>::width;

GF_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

int64_t pow2_ceil(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

// Unaligned vector load / add-store.  Vectors are never passed by value
// across functions: without AVX enabled that would change the calling ABI.
template <typename T>
GF_INLINE void load_vec(typename Vec<T>::type& v, const T* p) {
  std::memcpy(&v, p, sizeof(v));
}

template <typename T>
GF_INLINE void add_store_vec(T* p, const typename Vec<T>::type& v) {
  typename Vec<T>::type old;
  std::memcpy(&old, p, sizeof(old));
  old += v;
  std::memcpy(p, &old, sizeof(old));
}

// C[0:MR, 0:NR] += sum_{k < K} U[k, 0:MR] (x) V[k, 0:NR]; U, V and C have row
// strides ldu, ldv and ldc.  The MR x NR block stays in registers over the K
// loop.  A multiply-add has a latency of several cycles, so a thin block
// (MR = 1: two accumulators) also splits k into KS interleaved partial sums to
// keep enough independent chains in flight; they are added in a fixed order.
template <int MR, typename T>
GF_INLINE void micro_kernel(const T* U, int64_t ldu, const T* V, int64_t ldv, int64_t K, T* C,
                            int64_t ldc) {
  using VT = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  constexpr int KS = MR >= 4 ? 1 : 4;
  VT c[KS][MR][2];
  for (int s = 0; s < KS; ++s)
    for (int i = 0; i < MR; ++i) {
      c[s][i][0] = VT{};
      c[s][i][1] = VT{};
    }
  int64_t k = 0;
  for (; k + KS <= K; k += KS)
    for (int s = 0; s < KS; ++s) {
      VT v0, v1;
      load_vec(v0, V + (k + s) * ldv);
      load_vec(v1, V + (k + s) * ldv + W);
      const T* u = U + (k + s) * ldu;
      for (int i = 0; i < MR; ++i) {
        c[s][i][0] += u[i] * v0;
        c[s][i][1] += u[i] * v1;
      }
    }
  for (; k < K; ++k) {
    VT v0, v1;
    load_vec(v0, V + k * ldv);
    load_vec(v1, V + k * ldv + W);
    const T* u = U + k * ldu;
    for (int i = 0; i < MR; ++i) {
      c[0][i][0] += u[i] * v0;
      c[0][i][1] += u[i] * v1;
    }
  }
  for (int s = 1; s < KS; ++s)
    for (int i = 0; i < MR; ++i) {
      c[0][i][0] += c[s][i][0];
      c[0][i][1] += c[s][i][1];
    }
  for (int i = 0; i < MR; ++i) {
    add_store_vec(C + i * ldc, c[0][i][0]);
    add_store_vec(C + i * ldc + W, c[0][i][1]);
  }
}

// C[0:m, 0:n] += U[0:K, 0:m]^T V[0:K, 0:n] (row strides ldu, ldv, ldc); n must
// be a multiple of kNR<T>, m is exact.  Column blocks outermost: the K x kNR
// strip of V that a block reads is reused at once by every row block.
template <typename T>
GF_INLINE void tile_update(const T* U, int64_t ldu, const T* V, int64_t ldv, int64_t K, int64_t m,
                           int64_t n, T* C, int64_t ldc) {
  constexpr int64_t NR = kNR<T>;
  for (int64_t q = 0; q < n; q += NR) {
    int64_t p = 0;
    for (; p + kMR <= m; p += kMR)
      micro_kernel<kMR>(U + p, ldu, V + q, ldv, K, C + p * ldc + q, ldc);
    for (; p < m; ++p) micro_kernel<1>(U + p, ldu, V + q, ldv, K, C + p * ldc + q, ldc);
  }
}

// Scalar form of tile_update for the last n < kNR<T> columns of a tile that
// is read in place (there is no zero padding to round up to).
template <typename T>
GF_INLINE void tile_update_tail(const T* U, int64_t ldu, const T* V, int64_t ldv, int64_t K,
                                int64_t m, int64_t n, T* C, int64_t ldc) {
  for (int64_t p = 0; p < m; ++p)
    for (int64_t k = 0; k < K; ++k) {
      const T u = U[k * ldu + p];
      for (int64_t q = 0; q < n; ++q) C[p * ldc + q] += u * V[k * ldv + q];
    }
}

// dst[k][j] = src[row0 + k][col0 + j] for k < rows, j < w; zeros for
// w <= j < wpad.  src has row stride ld, dst kTile.
template <typename in_t, typename T>
GF_INLINE void stage_rows(const in_t* src, int64_t ld, int64_t row0, int64_t rows,
                          int64_t col0, int64_t w, int64_t wpad, T* dst) {
  for (int64_t k = 0; k < rows; ++k) {
    const in_t* s = src + (row0 + k) * ld + col0;
    T* d = dst + k * kTile;
    for (int64_t j = 0; j < w; ++j) d[j] = static_cast<T>(s[j]);
    for (int64_t j = w; j < wpad; ++j) d[j] = T(0);
  }
}

// Transposed staging: dst[k][i] = src[row0 + i][col0 + k] for i < h, k < kc;
// zeros for h <= i < hpad.  dst has row stride kTile.
template <typename in_t, typename T>
GF_INLINE void stage_cols(const in_t* src, int64_t ld, int64_t row0, int64_t h, int64_t hpad,
                          int64_t col0, int64_t kc, T* dst) {
  for (int64_t i = 0; i < h; ++i) {
    const in_t* s = src + (row0 + i) * ld + col0;
    for (int64_t k = 0; k < kc; ++k) dst[k * kTile + i] = static_cast<T>(s[k]);
  }
  for (int64_t i = h; i < hpad; ++i)
    for (int64_t k = 0; k < kc; ++k) dst[k * kTile + i] = T(0);
}

// sum_{p < m, q < n} X[p][q] * Y[p][q] in float64 (X, Y with row stride ld).
// Four interleaved float64 vector sums keep the adds independent; the order is
// fixed, so the result is too.
template <typename T>
GF_INLINE double dot_tiles(const T* X, const T* Y, int64_t m, int64_t n, int64_t ld) {
  using VD = typename Vec<double>::type;  // 4 x float64
  typedef T VS __attribute__((vector_size(4 * sizeof(T))));
  VD acc[4] = {VD{}, VD{}, VD{}, VD{}};
  double tail = 0.0;
  for (int64_t p = 0; p < m; ++p) {
    const T* x = X + p * ld;
    const T* y = Y + p * ld;
    int64_t q = 0;
    for (; q + 4 <= n; q += 4) {
      VS xs, ys;
      std::memcpy(&xs, x + q, sizeof(xs));
      std::memcpy(&ys, y + q, sizeof(ys));
      acc[(q >> 2) & 3] += __builtin_convertvector(xs, VD) * __builtin_convertvector(ys, VD);
    }
    for (; q < n; ++q) tail += static_cast<double>(x[q]) * static_cast<double>(y[q]);
  }
  const VD v = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  return ((v[0] + v[1]) + (v[2] + v[3])) + tail;
}

// One unit of parallel work: (example, i, j) where (i, j) is a tile of G
// (direct) or a row-block pair i <= j (ghost).
struct Item {
  int64_t example;
  int32_t i;
  int32_t j;
};

template <typename in_t>
struct Problem {
  const in_t* u;  // direct: the narrower factor; ghost: left
  const in_t* v;  // direct: the wider factor; ghost: right
  int64_t du;     // width of u
  int64_t dv;     // width of v
  const int64_t* cu;
  // Direct route: tile shape (tile_m x tile_n, at most kTileElems) and
  // whether rows are read in place (no conversion needed) or staged.
  int64_t tile_m = kTile;
  int64_t tile_n = kTile;
  bool in_place = false;
};

// Direct-route tiling.  Read in place (float32 / float64 with at most
// kInPlaceMaxRows tile rows), a tile with few rows gets proportionally more
// columns (up to kTileElems in all), so thin gradients (LoRA: rank x hidden)
// are swept in long contiguous row pieces.  Otherwise (float16 / bfloat16, or
// wide tiles) tiles are at most kTile x kTile and staged in chunks of kChunk
// rows.
template <typename in_t>
void plan_direct(Problem<in_t>& pb) {
  using T = at::opmath_type<in_t>;
  pb.in_place = std::is_same<in_t, T>::value && std::min(pb.du, kTile) <= kInPlaceMaxRows;
  pb.tile_m = std::min(pb.du, kTile);
  pb.tile_n = pb.in_place ? std::max(kTile, kTileElems / pow2_ceil(pb.tile_m)) : kTile;
}

// Elements of scratch space one thread needs (two accumulators, two stages).
constexpr int64_t kScratch = 2 * kTileElems + 2 * kChunk * kTile;

// Tile (i, j) of G_e, accumulated into scratch[0 : m x ldc] (row stride
// ldc = pb.tile_n); m and n are the tile's actual rows and columns.
template <typename in_t, typename T>
GF_HOT void direct_tile(const Problem<in_t>& pb, const Item& it, T* scratch, int64_t& m_out,
                        int64_t& n_out) {
  T* acc = scratch;
  T* su = acc + kTileElems;
  T* sv = su + kChunk * kTile;
  const int64_t r0 = pb.cu[it.example], r1 = pb.cu[it.example + 1];
  const int64_t p0 = int64_t(it.i) * pb.tile_m, q0 = int64_t(it.j) * pb.tile_n;
  const int64_t m = std::min(pb.tile_m, pb.du - p0);
  const int64_t n = std::min(pb.tile_n, pb.dv - q0);
  const int64_t ldc = pb.tile_n;
  const int64_t npad = round_up(n, kNR<T>);
  for (int64_t p = 0; p < m; ++p) std::fill(acc + p * ldc, acc + p * ldc + npad, T(0));
  if (pb.in_place) {
    const int64_t nfull = n / kNR<T> * kNR<T>;
    for (int64_t t = r0; t < r1; t += kRowStep) {
      const int64_t kt = std::min(kRowStep, r1 - t);
      const T* u = reinterpret_cast<const T*>(pb.u) + t * pb.du + p0;
      const T* v = reinterpret_cast<const T*>(pb.v) + t * pb.dv + q0;
      tile_update(u, pb.du, v, pb.dv, kt, m, nfull, acc, ldc);
      if (nfull < n)
        tile_update_tail(u, pb.du, v + nfull, pb.dv, kt, m, n - nfull, acc + nfull, ldc);
    }
  } else {
    for (int64_t t = r0; t < r1; t += kChunk) {
      const int64_t kt = std::min(kChunk, r1 - t);
      stage_rows(pb.u, pb.du, t, kt, p0, m, m, su);
      stage_rows(pb.v, pb.dv, t, kt, q0, n, npad, sv);
      tile_update(su, kTile, sv, kTile, kt, m, npad, acc, ldc);
    }
  }
  m_out = m;
  n_out = n;
}

// ||tile (i, j) of G_e||^2 for the direct route.
template <typename in_t, typename T>
GF_HOT double direct_item(const Problem<in_t>& pb, const Item& it, T* scratch) {
  int64_t m = 0, n = 0;
  direct_tile<in_t, T>(pb, it, scratch, m, n);
  return dot_tiles(scratch, scratch, m, n, pb.tile_n);
}

// Gram block (i, j) of one factor: C[0:hi, 0:hjpad] = X[rows_i] X[rows_j]^T.
template <typename in_t, typename T>
GF_INLINE void gram_block(const in_t* x, int64_t d, int64_t ri, int64_t hi, int64_t rj,
                          int64_t hj, int64_t hjpad, bool same, T* C, T* su, T* sv) {
  for (int64_t p = 0; p < hi; ++p) std::fill(C + p * kTile, C + p * kTile + hjpad, T(0));
  for (int64_t k = 0; k < d; k += kChunk) {
    const int64_t kc = std::min(kChunk, d - k);
    stage_cols(x, d, rj, hj, hjpad, k, kc, sv);
    if (!same) stage_cols(x, d, ri, hi, hi, k, kc, su);
    tile_update(same ? sv : su, kTile, sv, kTile, kc, hi, hjpad, C, kTile);
  }
}

// (2 - [i == j]) * <GL block, GR block> for the ghost route.
template <typename in_t, typename T>
GF_HOT double ghost_item(const Problem<in_t>& pb, const Item& it, T* scratch) {
  T* gl = scratch;
  T* gr = gl + kTileElems;
  T* su = gr + kTileElems;
  T* sv = su + kChunk * kTile;
  const int64_t r0 = pb.cu[it.example], r1 = pb.cu[it.example + 1];
  const int64_t ri = r0 + int64_t(it.i) * kTile, rj = r0 + int64_t(it.j) * kTile;
  const int64_t hi = std::min(kTile, r1 - ri), hj = std::min(kTile, r1 - rj);
  const int64_t hjpad = round_up(hj, kNR<T>);
  const bool same = it.i == it.j;
  gram_block(pb.u, pb.du, ri, hi, rj, hj, hjpad, same, gl, su, sv);
  gram_block(pb.v, pb.dv, ri, hi, rj, hj, hjpad, same, gr, su, sv);
  const double s = dot_tiles(gl, gr, hi, hj, kTile);
  return same ? s : 2.0 * s;
}

enum class Route { kDirect, kGhost };

Route parse_route(c10::string_view route) {
  if (route == "direct") return Route::kDirect;
  if (route == "ghost" || route == "gram") return Route::kGhost;
  TORCH_CHECK_VALUE(false, "outer_sq_norms: unknown route '", std::string(route),
                    "'; expected 'direct' or 'ghost' (alias 'gram')");
  return Route::kDirect;  // unreachable
}

// cu_seqlens as int64 after checking that it starts at 0, never decreases and
// ends at n_rows.
std::vector<int64_t> checked_offsets(const at::Tensor& cu_seqlens, int64_t n_rows) {
  const int64_t len = cu_seqlens.size(0);
  std::vector<int64_t> cu(static_cast<size_t>(len));
  if (cu_seqlens.scalar_type() == at::kLong) {
    const int64_t* p = cu_seqlens.data_ptr<int64_t>();
    std::copy(p, p + len, cu.begin());
  } else {
    const int32_t* p = cu_seqlens.data_ptr<int32_t>();
    std::copy(p, p + len, cu.begin());
  }
  TORCH_CHECK_VALUE(cu[0] == 0, "outer_sq_norms: cu_seqlens must start at 0, got cu_seqlens[0] = ",
                    cu[0]);
  for (int64_t i = 1; i < len; ++i)
    TORCH_CHECK_VALUE(cu[i] >= cu[i - 1], "outer_sq_norms: cu_seqlens must be non-decreasing; ",
                      "cu_seqlens[", i, "] = ", cu[i], " < cu_seqlens[", i - 1, "] = ", cu[i - 1]);
  TORCH_CHECK_VALUE(cu[len - 1] == n_rows, "outer_sq_norms: cu_seqlens must end at the number of ",
                    "rows N = ", n_rows, ", got cu_seqlens[", len - 1, "] = ", cu[len - 1]);
  return cu;
}

void check_inputs(const at::Tensor& left, const at::Tensor& right, const at::Tensor& cu_seqlens) {
  TORCH_CHECK_VALUE(left.dim() == 2 && right.dim() == 2,
                    "outer_sq_norms: left and right must be packed rows [N, a] and [N, b], got "
                    "shapes ", left.sizes(), " and ", right.sizes());
  TORCH_CHECK_VALUE(left.size(0) == right.size(0),
                    "outer_sq_norms: left and right must have the same number of rows, got ",
                    left.size(0), " and ", right.size(0));
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1,
                    "outer_sq_norms: cu_seqlens must be a 1-D tensor [B + 1], got shape ",
                    cu_seqlens.sizes());
  TORCH_CHECK(left.device().is_cpu() && right.device().is_cpu() && cu_seqlens.device().is_cpu(),
              "outer_sq_norms (C++) needs CPU tensors, got ", left.device(), ", ", right.device(),
              " and ", cu_seqlens.device());
  const auto dt = left.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   "outer_sq_norms: left and right must be float32, float64, float16 or bfloat16, "
                   "got ", left.scalar_type(), " and ", right.scalar_type());
  TORCH_CHECK_TYPE(right.scalar_type() == dt,
                   "outer_sq_norms: left and right must have the same dtype, got ",
                   left.scalar_type(), " and ", right.scalar_type());
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kLong || cu_seqlens.scalar_type() == at::kInt,
                   "outer_sq_norms: cu_seqlens must be int64 or int32, got ",
                   cu_seqlens.scalar_type());
  TORCH_CHECK(left.is_contiguous() && right.is_contiguous() && cu_seqlens.is_contiguous(),
              "outer_sq_norms: left, right and cu_seqlens must be contiguous (call .contiguous())");
}

template <typename in_t>
void run(const Problem<in_t>& pb, Route route, int64_t n_examples, double* out) {
  using T = at::opmath_type<in_t>;
  // Enumerate the work items and the multiply-adds they cost.
  std::vector<Item> items;
  int64_t work = 0;
  const int64_t tiles_u = (pb.du + pb.tile_m - 1) / pb.tile_m;
  const int64_t tiles_v = (pb.dv + pb.tile_n - 1) / pb.tile_n;
  for (int64_t e = 0; e < n_examples; ++e) {
    const int64_t n = pb.cu[e + 1] - pb.cu[e];
    if (n == 0) continue;
    if (route == Route::kDirect) {
      for (int64_t i = 0; i < tiles_u; ++i)
        for (int64_t j = 0; j < tiles_v; ++j)
          items.push_back({e, static_cast<int32_t>(i), static_cast<int32_t>(j)});
      work += n * pb.du * pb.dv;
    } else {
      const int64_t blocks = (n + kTile - 1) / kTile;
      TORCH_CHECK_VALUE(blocks <= INT32_MAX, "outer_sq_norms: example ", e, " has too many rows (",
                        n, ") for the ghost route");
      for (int64_t j = 0; j < blocks; ++j)
        for (int64_t i = 0; i <= j; ++i)
          items.push_back({e, static_cast<int32_t>(i), static_cast<int32_t>(j)});
      work += n * n * (pb.du + pb.dv) / 2;
    }
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<double> part(static_cast<size_t>(n_items), 0.0);
  int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), n_items));
  if (work < kParallelMinWork) threads = 1;
  threads = std::max(threads, 1);
  // Scratch is allocated here, not in the parallel region, so that nothing
  // inside it can throw.
  std::vector<T> scratch(static_cast<size_t>(threads * kScratch));

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    T* mine = scratch.data() + static_cast<int64_t>(omp_get_thread_num()) * kScratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < n_items; ++k) {
      part[k] = route == Route::kDirect ? direct_item<in_t, T>(pb, items[k], mine)
                                        : ghost_item<in_t, T>(pb, items[k], mine);
    }
  }

  std::fill(out, out + n_examples, 0.0);
  for (int64_t k = 0; k < n_items; ++k) out[items[k].example] += part[k];
}

at::Tensor outer_sq_norms_cpu(const at::Tensor& left, const at::Tensor& right,
                              const at::Tensor& cu_seqlens, c10::string_view route_name) {
  const Route route = parse_route(route_name);
  check_inputs(left, right, cu_seqlens);
  const int64_t n_rows = left.size(0);
  const std::vector<int64_t> cu = checked_offsets(cu_seqlens, n_rows);
  const int64_t n_examples = static_cast<int64_t>(cu.size()) - 1;
  const auto out_dtype = left.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::zeros({n_examples}, left.options().dtype(out_dtype));
  if (n_examples == 0 || n_rows == 0 || left.size(1) == 0 || right.size(1) == 0) return out;

  std::vector<double> total(static_cast<size_t>(n_examples));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, left.scalar_type(), "outer_sq_norms", [&] {
        const scalar_t* l = left.const_data_ptr<scalar_t>();
        const scalar_t* r = right.const_data_ptr<scalar_t>();
        Problem<scalar_t> pb{l, r, left.size(1), right.size(1), cu.data()};
        if (route == Route::kDirect && pb.du > pb.dv) {
          // ||L^T R|| = ||R^T L||: the narrower factor goes on the tile rows.
          std::swap(pb.u, pb.v);
          std::swap(pb.du, pb.dv);
        }
        if (route == Route::kDirect) plan_direct(pb);
        run<scalar_t>(pb, route, n_examples, total.data());
      });
  if (out_dtype == at::kDouble) {
    std::copy(total.begin(), total.end(), out.data_ptr<double>());
  } else {
    float* o = out.data_ptr<float>();
    for (int64_t e = 0; e < n_examples; ++e) o[e] = static_cast<float>(total[e]);
  }
  return out;
}

// The training pass: for every group g (a run of consecutive examples, e.g.
// one ensemble member's batch) the summed gradient sum_{e in g} G_e, and for
// every example ||G_e||^2, from the same direct-route tiles.  One work item is
// (group, tile): it walks the group's examples in order, square-sums each
// example's tile into its own slot and adds the tile to a float64 group sum,
// so the result does not depend on the thread count.
template <typename in_t>
void run_fused(const Problem<in_t>& pb, bool swapped, const std::vector<int64_t>& groups,
               int64_t n_examples, double* sq_out, double* grad_out, int64_t a, int64_t b) {
  using T = at::opmath_type<in_t>;
  const int64_t tiles_u = (pb.du + pb.tile_m - 1) / pb.tile_m;
  const int64_t tiles_v = (pb.dv + pb.tile_n - 1) / pb.tile_n;
  const int64_t n_tiles = tiles_u * tiles_v;
  const int64_t n_groups = static_cast<int64_t>(groups.size()) - 1;
  const int64_t n_items = n_groups * n_tiles;
  std::vector<double> part(static_cast<size_t>(n_examples * n_tiles), 0.0);
  int64_t work = pb.cu[n_examples] * pb.du * pb.dv;
  int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), n_items));
  if (work < kParallelMinWork) threads = 1;
  threads = std::max(threads, 1);
  std::vector<T> scratch(static_cast<size_t>(threads * kScratch));
  std::vector<double> sums(static_cast<size_t>(threads * kTileElems));

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int64_t tid = omp_get_thread_num();
    T* mine = scratch.data() + tid * kScratch;
    double* total = sums.data() + tid * kTileElems;
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < n_items; ++k) {
      const int64_t g = k / n_tiles, tile = k % n_tiles;
      const Item base{0, static_cast<int32_t>(tile / tiles_v), static_cast<int32_t>(tile % tiles_v)};
      const int64_t p0 = int64_t(base.i) * pb.tile_m, q0 = int64_t(base.j) * pb.tile_n;
      const int64_t m = std::min(pb.tile_m, pb.du - p0), n = std::min(pb.tile_n, pb.dv - q0);
      const int64_t ld = pb.tile_n;
      std::fill(total, total + m * ld, 0.0);
      for (int64_t e = groups[g]; e < groups[g + 1]; ++e) {
        if (pb.cu[e + 1] == pb.cu[e]) continue;
        Item it = base;
        it.example = e;
        int64_t mm = 0, nn = 0;
        direct_tile<in_t, T>(pb, it, mine, mm, nn);
        part[e * n_tiles + tile] = dot_tiles(mine, mine, m, n, ld);
        for (int64_t p = 0; p < m; ++p)
          for (int64_t q = 0; q < n; ++q) total[p * ld + q] += static_cast<double>(mine[p * ld + q]);
      }
      double* out = grad_out + g * a * b;
      for (int64_t p = 0; p < m; ++p)
        for (int64_t q = 0; q < n; ++q) {
          // u/v were swapped when the left factor is the wider one: G^T tiles.
          if (swapped) out[(q0 + q) * b + (p0 + p)] = total[p * ld + q];
          else out[(p0 + p) * b + (q0 + q)] = total[p * ld + q];
        }
    }
  }
  for (int64_t e = 0; e < n_examples; ++e) {
    double acc = 0.0;
    for (int64_t t = 0; t < n_tiles; ++t) acc += part[e * n_tiles + t];
    sq_out[e] = acc;
  }
}

std::tuple<at::Tensor, at::Tensor> outer_grad_sq_norms_cpu(const at::Tensor& left,
                                                           const at::Tensor& right,
                                                           const at::Tensor& cu_seqlens,
                                                           const at::Tensor& groups) {
  check_inputs(left, right, cu_seqlens);
  TORCH_CHECK_VALUE(groups.dim() == 1 && groups.size(0) >= 2,
                    "outer_grad_sq_norms: groups must be a 1-D tensor [G + 1] with G >= 1, got "
                    "shape ", groups.sizes());
  TORCH_CHECK_TYPE(groups.scalar_type() == at::kLong || groups.scalar_type() == at::kInt,
                   "outer_grad_sq_norms: groups must be int64 or int32, got ", groups.scalar_type());
  TORCH_CHECK(groups.device().is_cpu() && groups.is_contiguous(),
              "outer_grad_sq_norms: groups must be a contiguous CPU tensor");
  const int64_t n_rows = left.size(0);
  const std::vector<int64_t> cu = checked_offsets(cu_seqlens, n_rows);
  const int64_t n_examples = static_cast<int64_t>(cu.size()) - 1;
  std::vector<int64_t> g(static_cast<size_t>(groups.size(0)));
  for (int64_t i = 0; i < groups.size(0); ++i)
    g[i] = groups.scalar_type() == at::kLong ? groups.data_ptr<int64_t>()[i]
                                             : groups.data_ptr<int32_t>()[i];
  TORCH_CHECK_VALUE(g.front() == 0 && g.back() == n_examples,
                    "outer_grad_sq_norms: groups must run from 0 to the number of examples ",
                    n_examples, ", got ", g.front(), " .. ", g.back());
  for (size_t i = 1; i < g.size(); ++i)
    TORCH_CHECK_VALUE(g[i] >= g[i - 1], "outer_grad_sq_norms: groups must be non-decreasing");
  const int64_t a = left.size(1), b = right.size(1);
  const int64_t n_groups = static_cast<int64_t>(g.size()) - 1;
  const auto out_dtype = left.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<double> sq(static_cast<size_t>(n_examples), 0.0);
  std::vector<double> grad(static_cast<size_t>(n_groups * a * b), 0.0);
  if (n_examples > 0 && n_rows > 0 && a > 0 && b > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, left.scalar_type(), "outer_grad_sq_norms", [&] {
          const scalar_t* l = left.const_data_ptr<scalar_t>();
          const scalar_t* r = right.const_data_ptr<scalar_t>();
          Problem<scalar_t> pb{l, r, a, b, cu.data()};
          const bool swapped = pb.du > pb.dv;
          if (swapped) {
            std::swap(pb.u, pb.v);
            std::swap(pb.du, pb.dv);
          }
          plan_direct(pb);
          run_fused<scalar_t>(pb, swapped, g, n_examples, sq.data(), grad.data(), a, b);
        });
  }
  auto opts = left.options().dtype(at::kDouble);
  at::Tensor sq_t = at::zeros({n_examples}, opts);
  at::Tensor grad_t = at::zeros({n_groups, a, b}, opts);
  std::copy(sq.begin(), sq.end(), sq_t.data_ptr<double>());
  std::copy(grad.begin(), grad.end(), grad_t.data_ptr<double>());
  return {grad_t.to(out_dtype), sq_t.to(out_dtype)};
}

}  // namespace

TORCH_LIBRARY(gradfilter_cpp, m) {
  m.def("outer_sq_norms(Tensor left, Tensor right, Tensor cu_seqlens, str route) -> Tensor");
  m.def("outer_grad_sq_norms(Tensor left, Tensor right, Tensor cu_seqlens, Tensor groups) -> "
        "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gradfilter_cpp, CPU, m) {
  m.impl("outer_sq_norms", &outer_sq_norms_cpu);
  m.impl("outer_grad_sq_norms", &outer_grad_sq_norms_cpu);
}
