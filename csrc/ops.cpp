// Thin glue: argument checks (naming the argument), outputs, tensor -> kernel parameters, and the
// CPU entry points (rows split across threads with at::parallel_for).
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "cpu/logps_cpu.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace fastdpo {
namespace {

// The kernels accumulate in fp32 and keep no fp64 path: fp64 logits go to the torch backend.
DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: {
      const char* hint = t.scalar_type() == at::kDouble ? " (the torch backend takes float64)" : "";
      TORCH_CHECK(false, op, ": the native backend takes fp32/bf16/fp16 logits, got ",
                  t.scalar_type(), hint);
    }
  }
}

// c = 1 / temperature as the kernels use it: finite and positive in fp32, or refused.
float inv_temperature(double temperature, const char* op) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op,
              ": temperature must be a finite positive number, got ", temperature);
  const float c = static_cast<float>(1.0 / temperature);
  TORCH_CHECK(std::isfinite(c) && c > 0.0f, op, ": temperature ", temperature,
              " is outside the range fp32 kernels can scale by (1 / temperature must be a finite "
              "positive fp32 number)");
  return c;
}

void check_rows_tensor(const at::Tensor& t, const char* op, const char* name,
                       const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on the logits' device ",
              logits.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == logits.size(0) && t.size(1) == logits.size(1), op, ": ",
              name, " must have shape (B, T) = ", logits.sizes().slice(0, 2), ", got ", t.sizes());
}

void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start,
                         int64_t vocab_total, const char* op) {
  TORCH_CHECK(logits.defined(), op, ": logits is undefined");
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be 3-D (B, T, V), got shape ", logits.sizes());
  TORCH_CHECK(logits.size(2) <= 1 || logits.stride(2) == 1, op,
              ": logits must have unit stride along the vocabulary (last) dimension, got strides ",
              logits.strides());
  TORCH_CHECK(labels.defined(), op, ": labels is undefined");
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": labels must be int64 or int32, got ", labels.scalar_type());
  check_rows_tensor(labels, op, "labels", logits);
  TORCH_CHECK(vocab_start >= 0, op, ": vocab_start must be >= 0, got ", vocab_start);
  TORCH_CHECK(vocab_total >= 0, op, ": vocab_total must be >= 0, got ", vocab_total);
}

void check_f32_rows(const at::Tensor& t, const char* op, const char* name,
                    const at::Tensor& logits) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  check_rows_tensor(t, op, name, logits);
}

RowsLayout rows_of(const at::Tensor& logits) {
  RowsLayout r;
  r.B = logits.size(0);
  r.T = logits.size(1);
  r.V = logits.size(2);
  r.stride_b = logits.stride(0);
  r.stride_t = logits.stride(1);
  return r;
}

LabelsView labels_of(const at::Tensor& labels) {
  LabelsView l;
  l.data = labels.data_ptr();
  l.is_int64 = labels.scalar_type() == at::kLong;
  l.stride_b = labels.stride(0);
  l.stride_t = labels.stride(1);
  return l;
}

RowScalars scalars_of(const at::Tensor& t) {
  RowScalars r;
  r.data = t.data_ptr<float>();
  r.stride_b = t.stride(0);
  r.stride_t = t.stride(1);
  return r;
}

// [first, last] byte addresses a strided tensor can touch.
std::pair<uintptr_t, uintptr_t> byte_extent(const at::Tensor& t) {
  uintptr_t lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  uintptr_t span = 1;
  for (int64_t d = 0; d < t.dim(); ++d) {
    span += static_cast<uintptr_t>((t.size(d) - 1) * t.stride(d));
  }
  return {lo, lo + span * t.element_size() - 1};
}

// The gradient may be written into the logits themselves (same elements) or into separate
// memory; anything in between would read logits that were already overwritten.
void check_grad_aliasing(const at::Tensor& grad, const at::Tensor& logits, const char* op) {
  if (grad.numel() == 0 || logits.numel() == 0) return;
  if (grad.data_ptr() == logits.data_ptr()) {
    TORCH_CHECK(grad.strides() == logits.strides(), op,
                ": grad_logits shares its start with logits but has different strides ",
                grad.strides(), " vs ", logits.strides());
    return;
  }
  if (!grad.is_alias_of(logits)) return;
  const auto g = byte_extent(grad), x = byte_extent(logits);
  TORCH_CHECK(g.second < x.first || x.second < g.first, op,
              ": grad_logits partially overlaps logits; pass logits itself (in-place) or "
              "separate memory");
}

// An out-of-place gradient is usually a fresh allocation that the backward touches first. With
// transparent huge pages in "madvise" mode (a common default), asking for them turns the ~262k
// page faults of a 1 GiB gradient into ~512, which is most of the cost of an out-of-place backward.
// Advisory only: failures (file-backed memory, THP off) change nothing.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (t.numel() == 0) return;
  const auto extent = byte_extent(t);
  constexpr uintptr_t kMinBytes = uintptr_t{8} << 20;
  if (extent.second - extent.first + 1 < kMinBytes) return;
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t start = (extent.first + page - 1) & ~(page - 1);  // only whole pages of `t`
  const uintptr_t end = (extent.second + 1) & ~(page - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

std::atomic<bool> g_force_generic{[] {
  const char* env = std::getenv("FASTDPO_CPU_KERNEL");
  return env != nullptr && std::strcmp(env, "generic") == 0;
}()};

bool use_avx2() {
  return !g_force_generic.load(std::memory_order_relaxed) && cpu::avx2_supported();
}

// Rows per task: about 32k elements, so short rows are not split one per task.
int64_t grain_rows(int64_t V) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1));
}

}  // namespace

LogpsFwdParams prepare_fwd(const at::Tensor& logits, const at::Tensor& labels,
                           int64_t ignore_index, double temperature, int64_t vocab_start,
                           int64_t vocab_total, bool with_entropy, FwdOutputs& out) {
  const char* op = "native_logps_fwd";
  check_logits_labels(logits, labels, vocab_start, vocab_total, op);
  const float c = inv_temperature(temperature, op);
  LogpsFwdParams p;
  p.dtype = dtype_of(logits, op);
  p.rows = rows_of(logits);
  const auto opts = logits.options().dtype(at::kFloat);
  out.logp = at::empty({p.rows.B, p.rows.T}, opts);
  out.row_max = at::empty({p.rows.B, p.rows.T}, opts);
  out.log_sum = at::empty({p.rows.B, p.rows.T}, opts);
  out.entropy = with_entropy ? at::empty({p.rows.B, p.rows.T}, opts) : at::empty({0}, opts);
  p.logits = logits.data_ptr();
  p.labels = labels_of(labels);
  p.rule = LabelRule{ignore_index, vocab_start, vocab_total};
  p.inv_temp = c;
  p.logp = out.logp.data_ptr<float>();
  p.row_max = out.row_max.data_ptr<float>();
  p.log_sum = out.log_sum.data_ptr<float>();
  p.entropy = with_entropy ? out.entropy.data_ptr<float>() : nullptr;
  return p;
}

LogpsBwdParams prepare_bwd(const at::Tensor& grad_logp,
                           const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                           const at::Tensor& labels, const at::Tensor& row_max,
                           const at::Tensor& log_sum, const std::optional<at::Tensor>& entropy,
                           int64_t ignore_index, double temperature, int64_t vocab_start,
                           int64_t vocab_total, const at::Tensor& grad_logits) {
  const char* op = "native_logps_bwd";
  check_logits_labels(logits, labels, vocab_start, vocab_total, op);
  const float c = inv_temperature(temperature, op);
  LogpsBwdParams p;
  p.dtype = dtype_of(logits, op);
  check_f32_rows(grad_logp, op, "grad_logp", logits);
  check_f32_rows(row_max, op, "row_max", logits);
  check_f32_rows(log_sum, op, "log_sum", logits);
  const bool with_entropy = grad_entropy.has_value() && grad_entropy->defined();
  if (with_entropy) {
    check_f32_rows(*grad_entropy, op, "grad_entropy", logits);
    TORCH_CHECK(entropy.has_value() && entropy->defined(), op,
                ": entropy is required when grad_entropy is given");
    check_f32_rows(*entropy, op, "entropy", logits);
  }
  TORCH_CHECK(grad_logits.defined(), op, ": grad_logits is undefined");
  TORCH_CHECK(grad_logits.device() == logits.device(), op,
              ": grad_logits must be on the logits' device ", logits.device(), ", got ",
              grad_logits.device());
  TORCH_CHECK(grad_logits.sizes() == logits.sizes(), op,
              ": grad_logits must have the logits' shape ", logits.sizes(), ", got ",
              grad_logits.sizes());
  TORCH_CHECK(grad_logits.scalar_type() == logits.scalar_type(), op,
              ": grad_logits must have the logits' dtype ", logits.scalar_type(), ", got ",
              grad_logits.scalar_type());
  TORCH_CHECK(grad_logits.size(2) <= 1 || grad_logits.stride(2) == 1, op,
              ": grad_logits must have unit stride along the vocabulary (last) dimension, got "
              "strides ", grad_logits.strides());
  check_grad_aliasing(grad_logits, logits, op);
  p.logits = logits.data_ptr();
  p.rows = rows_of(logits);
  p.grad_logits = grad_logits.data_ptr();
  p.grad_stride_b = grad_logits.stride(0);
  p.grad_stride_t = grad_logits.stride(1);
  p.labels = labels_of(labels);
  p.rule = LabelRule{ignore_index, vocab_start, vocab_total};
  p.inv_temp = c;
  p.grad_logp = scalars_of(grad_logp);
  p.row_max = scalars_of(row_max);
  p.log_sum = scalars_of(log_sum);
  if (with_entropy) {
    p.grad_entropy = scalars_of(*grad_entropy);
    p.entropy = scalars_of(*entropy);
  }
  return p;
}

FwdResult logps_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                        double temperature, int64_t vocab_start, int64_t vocab_total,
                        bool with_entropy) {
  FwdOutputs out;
  const LogpsFwdParams p = prepare_fwd(logits, labels, ignore_index, temperature, vocab_start,
                                       vocab_total, with_entropy, out);
  const int64_t rows = p.rows.B * p.rows.T;
  const bool avx2 = use_avx2();
  at::parallel_for(0, rows, grain_rows(p.rows.V), [&](int64_t r0, int64_t r1) {
    if (avx2) cpu::logps_fwd_rows_avx2(p, r0, r1);
    else cpu::logps_fwd_rows_generic(p, r0, r1);
  });
  return {out.logp, out.row_max, out.log_sum, out.entropy};
}

void logps_bwd_cpu(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                   const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& row_max,
                   const at::Tensor& log_sum, const std::optional<at::Tensor>& entropy,
                   int64_t ignore_index, double temperature, int64_t vocab_start,
                   int64_t vocab_total, const at::Tensor& grad_logits) {
  const LogpsBwdParams p =
      prepare_bwd(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy,
                  ignore_index, temperature, vocab_start, vocab_total, grad_logits);
  const int64_t rows = p.rows.B * p.rows.T;
  if (grad_logits.data_ptr() != logits.data_ptr()) advise_huge_pages(grad_logits);
  const bool avx2 = use_avx2();
  at::parallel_for(0, rows, grain_rows(p.rows.V), [&](int64_t r0, int64_t r1) {
    if (avx2) cpu::logps_bwd_rows_avx2(p, r0, r1);
    else cpu::logps_bwd_rows_generic(p, r0, r1);
  });
}

std::string cpu_kernel() { return use_avx2() ? "avx2" : "generic"; }

void set_cpu_kernel(const std::string& name) {
  TORCH_CHECK(name == "auto" || name == "generic",
              "set_cpu_kernel: name must be 'auto' or 'generic', got '", name, "'");
  g_force_generic.store(name == "generic");
}

}  // namespace fastdpo
