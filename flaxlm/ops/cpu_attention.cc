// Fused scaled dot-product attention (optionally causal) for XLA:CPU in float32, called through the XLA FFI.
//
// Layouts are JAX's: q [N, T, H, D], k/v [N, S, H, D] (or one packed qkv [N, T, 3, H, D] for self-attention),
// out [N, T, H, D], lse [N, H, T] (N = product of the leading axes). Each (n, h) pair is one work item; the
// items are shared among XLA's intra-op threads. The backward pass recomputes the softmax from lse.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
constexpr int kRows = 8;  // query rows per block
constexpr int kLanes = 8;

inline v8 load(const float* p) { v8 r; std::memcpy(&r, p, sizeof(r)); return r; }
inline void store(float* p, v8 x) { std::memcpy(p, &x, sizeof(x)); }
inline v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }
inline float hsum(v8 x) { float s = 0; for (int i = 0; i < kLanes; ++i) s += x[i]; return s; }
inline float hmax(v8 x) { float m = x[0]; for (int i = 1; i < kLanes; ++i) m = std::max(m, x[i]); return m; }

// exp(x), relative error about 2e-7 for x in [-87, 88]; below -87.3 (and -inf) it returns 0.
inline v8 vexp(v8 x) {
  const v8 lo = splat(-87.3f);
  v8 xc = x < lo ? lo : x;
  xc = xc > splat(88.0f) ? splat(88.0f) : xc;
  const v8 magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  v8 n = (xc * splat(1.44269504088896341f) + magic) - magic;
  v8 r = xc - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  v8 y = p * r * r + r + splat(1.0f);
  v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  y = y * scale;
  return x < lo ? splat(0.0f) : y;
}

struct Dims {
  int64_t items, n, t, s, h, d;
  int64_t sp;  // s rounded up to a multiple of kLanes
};

// Runs fn(item) for item in [0, total) on the caller and up to pool.num_threads() helpers; returns when all ran.
template <typename F>
void parallel_items(ffi::ThreadPool& pool, int64_t total, F fn) {
  struct Job {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  auto job = std::make_shared<Job>();
  auto work = [job, total, &fn]() {
    for (int64_t i; (i = job->next.fetch_add(1)) < total;) {
      fn(i);
      job->finished.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), total - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([job, total, fnp = &fn]() {
      for (int64_t i; (i = job->next.fetch_add(1)) < total;) {
        (*fnp)(i);
        job->finished.fetch_add(1, std::memory_order_release);
      }
    });
  }
  work();
  while (job->finished.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

// dst[r][j] = sum_d rows[r][d] * packed[d][j] for r < nr, j < ncols (multiple of kLanes). rows stride: rstride.
inline void rows_times_packed(const float* rows, int64_t rstride, int nr, const float* packed, int64_t pstride,
                              int64_t d, int64_t ncols, float* dst, int64_t dstride) {
  for (int64_t j = 0; j < ncols; j += kLanes) {
    v8 acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = splat(0.0f);
    for (int64_t c = 0; c < d; ++c) {
      v8 kv = load(packed + c * pstride + j);
      for (int r = 0; r < kRows; ++r) acc[r] += splat(rows[std::min(r, nr - 1) * rstride + c]) * kv;
    }
    for (int r = 0; r < nr; ++r) store(dst + r * dstride + j, acc[r]);
  }
}

// out[r][:] = alpha * sum_{j < ncols} w[r][j] * src[j][:] for r < nr (src rows of d floats, stride sstride).
inline void weights_times_rows(const float* w, int64_t wstride, int nr, const float* src, int64_t sstride,
                               int64_t ncols, int64_t d, float alpha, float* out, int64_t ostride) {
  for (int64_t c = 0; c < d; c += 2 * kLanes) {
    bool two = c + kLanes < d;
    for (int r0 = 0; r0 < nr; r0 += 4) {
      int rn = std::min(4, nr - r0);
      v8 a0[4], a1[4];
      for (int r = 0; r < 4; ++r) a0[r] = a1[r] = splat(0.0f);
      for (int64_t j = 0; j < ncols; ++j) {
        v8 s0 = load(src + j * sstride + c);
        v8 s1 = two ? load(src + j * sstride + c + kLanes) : splat(0.0f);
        for (int r = 0; r < 4; ++r) {
          v8 wv = splat(w[std::min(r0 + r, nr - 1) * wstride + j]);
          a0[r] += wv * s0;
          a1[r] += wv * s1;
        }
      }
      for (int r = 0; r < rn; ++r) {
        store(out + (r0 + r) * ostride + c, a0[r] * splat(alpha));
        if (two) store(out + (r0 + r) * ostride + c + kLanes, a1[r] * splat(alpha));
      }
    }
  }
}

// acc[j][:] += alpha * sum_{r < nr} w[r][j] * rows[r][:] for j < ncols.
inline void accumulate_outer(const float* w, int64_t wstride, int nr, const float* rows, int64_t rstride,
                             int64_t ncols, int64_t d, float alpha, float* acc) {
  for (int64_t j = 0; j < ncols; ++j) {
    float* a = acc + j * d;
    for (int64_t c = 0; c < d; c += kLanes) {
      v8 s = load(a + c);
      for (int r = 0; r < nr; ++r) s += splat(alpha * w[r * wstride + j]) * load(rows + r * rstride + c);
      store(a + c, s);
    }
  }
}

// Packs src rows [s][d] (row stride sstride) into dst [d][sp] (zero columns from s to sp).
inline void pack_transposed(const float* src, int64_t sstride, const Dims& dm, float* dst) {
  for (int64_t c = 0; c < dm.d; ++c) {
    float* row = dst + c * dm.sp;
    for (int64_t j = 0; j < dm.s; ++j) row[j] = src[j * sstride + c];
    for (int64_t j = dm.s; j < dm.sp; ++j) row[j] = 0.0f;
  }
}

// Number of keys query row i may see.
inline int64_t visible(int64_t i, bool causal, const Dims& dm) { return causal ? std::min(i + 1, dm.s) : dm.s; }

// Turns logits rows into probabilities: p = exp(scale * l - m) over visible keys, 0 elsewhere (up to ncols).
// With lse given (backward), m = lse and no normalisation; otherwise normalises and writes lse.
inline void softmax_rows(float* l, int64_t lstride, int nr, int64_t i0, int64_t ncols, bool causal, float scale,
                         const Dims& dm, const float* lse_in, float* lse_out) {
  for (int r = 0; r < nr; ++r) {
    float* row = l + r * lstride;
    int64_t n = visible(i0 + r, causal, dm);
    float m;
    if (lse_in) {
      m = lse_in[r];
    } else {
      v8 mv = splat(-INFINITY);
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) { v8 x = load(row + j); mv = x > mv ? x : mv; }
      m = hmax(mv);
      for (; j < n; ++j) m = std::max(m, row[j]);
      m *= scale;
    }
    v8 sum = splat(0.0f);
    for (int64_t j = 0; j < ncols; j += kLanes) {
      v8 e = vexp(load(row + j) * splat(scale) - splat(m));
      for (int k = 0; k < kLanes; ++k) if (j + k >= n) e[k] = 0.0f;
      sum += e;
      store(row + j, e);
    }
    if (!lse_in) {
      float total = hsum(sum);
      float inv = 1.0f / total;
      for (int64_t j = 0; j < ncols; j += kLanes) store(row + j, load(row + j) * splat(inv));
      lse_out[r] = m + std::log(total);
    }
  }
}

// A [N, T, ..., H, D] operand seen as rows: element (b, t, h, :) starts at base + b * batch + t * row + h * D.
// Separate q/k/v arrays [N, T, H, D] have row = H * D; the packed qkv array [N, T, 3, H, D] has row = 3 * H * D
// and k, v start H * D and 2 * H * D after q.
struct View {
  float* base;
  int64_t batch, row;
  float* at(int64_t b, int64_t h, int64_t d) const { return base + b * batch + h * d; }
};

View separate(float* base, int64_t len, const Dims& dm) { return {base, len * dm.h * dm.d, dm.h * dm.d}; }

View packed(float* base, int64_t part, const Dims& dm) {
  return {base + part * dm.h * dm.d, dm.t * 3 * dm.h * dm.d, 3 * dm.h * dm.d};
}

// Dims from q's shape [..., T, H, D] (rank - 3 leading axes) and the key length.
Dims dims_of(const ffi::AnyBuffer::Dimensions& qd, int lead, int64_t s) {
  Dims dm;
  dm.n = 1;
  for (int i = 0; i < lead; ++i) dm.n *= qd[i];
  dm.t = qd[lead];
  dm.h = qd[qd.size() - 2];
  dm.d = qd[qd.size() - 1];
  dm.s = s;
  dm.sp = (dm.s + kLanes - 1) / kLanes * kLanes;
  dm.items = dm.n * dm.h;
  return dm;
}

void forward_views(ffi::ThreadPool& pool, const Dims& dm, View q, View k, View v, View out, float* lse,
                   bool causal, float scale) {
  auto item = [&](int64_t it) {
    thread_local std::vector<float> kt, logits;
    kt.resize(dm.d * dm.sp);
    logits.resize(kRows * dm.sp);
    int64_t b = it / dm.h, hh = it % dm.h;
    const float* qb = q.at(b, hh, dm.d);
    const float* vb = v.at(b, hh, dm.d);
    float* ob = out.at(b, hh, dm.d);
    float* lb = lse + it * dm.t;
    pack_transposed(k.at(b, hh, dm.d), k.row, dm, kt.data());
    for (int64_t i0 = 0; i0 < dm.t; i0 += kRows) {
      int nr = std::min<int64_t>(kRows, dm.t - i0);
      int64_t n = visible(i0 + nr - 1, causal, dm);
      int64_t ncols = (n + kLanes - 1) / kLanes * kLanes;
      rows_times_packed(qb + i0 * q.row, q.row, nr, kt.data(), dm.sp, dm.d, ncols, logits.data(), dm.sp);
      softmax_rows(logits.data(), dm.sp, nr, i0, ncols, causal, scale, dm, nullptr, lb + i0);
      weights_times_rows(logits.data(), dm.sp, nr, vb, v.row, n, dm.d, 1.0f, ob + i0 * out.row, out.row);
    }
  };
  parallel_items(pool, dm.items, item);
}

void backward_views(ffi::ThreadPool& pool, const Dims& dm, View q, View k, View v, View o, const float* lse,
                    View g, View dq, View dk, View dv, bool causal, float scale) {
  auto item = [&](int64_t it) {
    thread_local std::vector<float> kt, vt, p, dp, dk_acc, dv_acc;
    kt.resize(dm.d * dm.sp);
    vt.resize(dm.d * dm.sp);
    p.resize(kRows * dm.sp);
    dp.resize(kRows * dm.sp);
    dk_acc.assign(dm.s * dm.d, 0.0f);
    dv_acc.assign(dm.s * dm.d, 0.0f);
    int64_t b = it / dm.h, hh = it % dm.h;
    const float* kb = k.at(b, hh, dm.d);
    pack_transposed(kb, k.row, dm, kt.data());
    pack_transposed(v.at(b, hh, dm.d), v.row, dm, vt.data());
    const float* lb = lse + it * dm.t;
    for (int64_t i0 = 0; i0 < dm.t; i0 += kRows) {
      int nr = std::min<int64_t>(kRows, dm.t - i0);
      int64_t n = visible(i0 + nr - 1, causal, dm);
      int64_t ncols = (n + kLanes - 1) / kLanes * kLanes;
      const float* qrows = q.at(b, hh, dm.d) + i0 * q.row;
      const float* grows = g.at(b, hh, dm.d) + i0 * g.row;
      const float* orows = o.at(b, hh, dm.d) + i0 * o.row;
      rows_times_packed(qrows, q.row, nr, kt.data(), dm.sp, dm.d, ncols, p.data(), dm.sp);
      softmax_rows(p.data(), dm.sp, nr, i0, ncols, causal, scale, dm, lb + i0, nullptr);
      rows_times_packed(grows, g.row, nr, vt.data(), dm.sp, dm.d, ncols, dp.data(), dm.sp);
      for (int r = 0; r < nr; ++r) {
        v8 acc = splat(0.0f);
        for (int64_t c = 0; c < dm.d; c += kLanes) acc += load(grows + r * g.row + c) * load(orows + r * o.row + c);
        v8 delta = splat(hsum(acc));
        float* pr = p.data() + r * dm.sp;
        float* dr = dp.data() + r * dm.sp;
        for (int64_t j = 0; j < ncols; j += kLanes) store(dr + j, load(pr + j) * (load(dr + j) - delta));
      }
      weights_times_rows(dp.data(), dm.sp, nr, kb, k.row, n, dm.d, scale, dq.at(b, hh, dm.d) + i0 * dq.row, dq.row);
      accumulate_outer(p.data(), dm.sp, nr, grows, g.row, n, dm.d, 1.0f, dv_acc.data());
      accumulate_outer(dp.data(), dm.sp, nr, qrows, q.row, n, dm.d, scale, dk_acc.data());
    }
    float* dkb = dk.at(b, hh, dm.d);
    float* dvb = dv.at(b, hh, dm.d);
    for (int64_t j = 0; j < dm.s; ++j) {
      std::memcpy(dkb + j * dk.row, dk_acc.data() + j * dm.d, dm.d * sizeof(float));
      std::memcpy(dvb + j * dv.row, dv_acc.data() + j * dm.d, dm.d * sizeof(float));
    }
  };
  parallel_items(pool, dm.items, item);
}

float* data(ffi::Buffer<ffi::F32>& x) { return x.typed_data(); }
float* data(ffi::Result<ffi::Buffer<ffi::F32>>& x) { return x->typed_data(); }

ffi::Error check_head_dim(const Dims& dm) {
  if (dm.d % kLanes) return ffi::Error::InvalidArgument("head_dim must be a multiple of 8");
  return ffi::Error::Success();
}

// q [..., T, H, D], k/v [..., S, H, D] -> out [..., T, H, D], lse [..., H, T].
ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, bool causal, float scale) {
  int lead = q.dimensions().size() - 3;
  Dims dm = dims_of(q.dimensions(), lead, k.dimensions()[lead]);
  if (ffi::Error e = check_head_dim(dm); e.failure()) return e;
  forward_views(pool, dm, separate(data(q), dm.t, dm), separate(data(k), dm.s, dm), separate(data(v), dm.s, dm),
                separate(data(out), dm.t, dm), data(lse), causal, scale);
  return ffi::Error::Success();
}

// qkv [..., T, 3, H, D] -> out [..., T, H, D], lse [..., H, T].
ffi::Error forward_packed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::ResultBuffer<ffi::F32> out,
                          ffi::ResultBuffer<ffi::F32> lse, bool causal, float scale) {
  int lead = qkv.dimensions().size() - 4;
  Dims dm = dims_of(qkv.dimensions(), lead, qkv.dimensions()[lead]);
  if (ffi::Error e = check_head_dim(dm); e.failure()) return e;
  float* base = data(qkv);
  forward_views(pool, dm, packed(base, 0, dm), packed(base, 1, dm), packed(base, 2, dm),
                separate(data(out), dm.t, dm), data(lse), causal, scale);
  return ffi::Error::Success();
}

// (q, k, v, out, lse, d_out) -> (dq, dk, dv), shapes as in forward.
ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> g,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    bool causal, float scale) {
  int lead = q.dimensions().size() - 3;
  Dims dm = dims_of(q.dimensions(), lead, k.dimensions()[lead]);
  if (ffi::Error e = check_head_dim(dm); e.failure()) return e;
  backward_views(pool, dm, separate(data(q), dm.t, dm), separate(data(k), dm.s, dm), separate(data(v), dm.s, dm),
                 separate(data(o), dm.t, dm), data(lse), separate(data(g), dm.t, dm), separate(data(dq), dm.t, dm),
                 separate(data(dk), dm.s, dm), separate(data(dv), dm.s, dm), causal, scale);
  return ffi::Error::Success();
}

// (qkv, out, lse, d_out) -> d_qkv [..., T, 3, H, D].
ffi::Error backward_packed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> o,
                           ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dqkv,
                           bool causal, float scale) {
  int lead = qkv.dimensions().size() - 4;
  Dims dm = dims_of(qkv.dimensions(), lead, qkv.dimensions()[lead]);
  if (ffi::Error e = check_head_dim(dm); e.failure()) return e;
  float *base = data(qkv), *grad = data(dqkv);
  backward_views(pool, dm, packed(base, 0, dm), packed(base, 1, dm), packed(base, 2, dm), separate(data(o), dm.t, dm),
                 data(lse), separate(data(g), dm.t, dm), packed(grad, 0, dm), packed(grad, 1, dm),
                 packed(grad, 2, dm), causal, scale);
  return ffi::Error::Success();
}

}  // namespace

using F32Buffer = ffi::Buffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxlmAttentionForward, forward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32Buffer>().Arg<F32Buffer>()
                                  .Arg<F32Buffer>().Ret<F32Buffer>().Ret<F32Buffer>()
                                  .Attr<bool>("causal").Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxlmAttentionForwardPacked, forward_packed,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32Buffer>().Ret<F32Buffer>()
                                  .Ret<F32Buffer>().Attr<bool>("causal").Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxlmAttentionBackward, backward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32Buffer>().Arg<F32Buffer>()
                                  .Arg<F32Buffer>().Arg<F32Buffer>().Arg<F32Buffer>().Arg<F32Buffer>()
                                  .Ret<F32Buffer>().Ret<F32Buffer>().Ret<F32Buffer>()
                                  .Attr<bool>("causal").Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxlmAttentionBackwardPacked, backward_packed,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32Buffer>().Arg<F32Buffer>()
                                  .Arg<F32Buffer>().Arg<F32Buffer>().Ret<F32Buffer>()
                                  .Attr<bool>("causal").Attr<float>("scale"));
