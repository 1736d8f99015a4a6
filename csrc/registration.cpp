// Registers the native kernels for the schemas fastdpo/ops.py defines, and a small Python module
// (fastdpo.native._C) with build facts and the header math exposed for tests.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "cpu/logps_cpu.h"
#include "fastdpo/logps_grad.h"
#include "fastdpo/online_softmax.h"
#include "ops.h"

TORCH_LIBRARY_IMPL(fastdpo, CPU, m) {
  m.impl("native_logps_fwd", TORCH_FN(fastdpo::logps_fwd_cpu));
  m.impl("native_logps_bwd", TORCH_FN(fastdpo::logps_bwd_cpu));
  m.impl("native_linear_logps_fwd", TORCH_FN(fastdpo::linear_fwd_cpu));
  m.impl("native_linear_logps_bwd", TORCH_FN(fastdpo::linear_bwd_cpu));
  m.impl("native_linear_frozen_fwd", TORCH_FN(fastdpo::linear_frozen_fwd_cpu));
  m.impl("native_linear_keep_fwd", TORCH_FN(fastdpo::linear_keep_fwd_cpu));
  m.impl("native_linear_keep_bwd", TORCH_FN(fastdpo::linear_keep_bwd_cpu));
}

#ifdef FASTDPO_WITH_CUDA
TORCH_LIBRARY_IMPL(fastdpo, CUDA, m) {
  m.impl("native_logps_fwd", TORCH_FN(fastdpo::logps_fwd_cuda));
  m.impl("native_logps_bwd", TORCH_FN(fastdpo::logps_bwd_cuda));
}
#endif

namespace {

namespace py = pybind11;
using State3 = std::tuple<double, double, double>;

template <class A>
fastdpo::SoftmaxState<A> from_tuple(const State3& s) {
  return {static_cast<A>(std::get<0>(s)), static_cast<A>(std::get<1>(s)),
          static_cast<A>(std::get<2>(s))};
}
template <class A>
State3 to_tuple(const fastdpo::SoftmaxState<A>& s) {
  return {static_cast<double>(s.m), static_cast<double>(s.s), static_cast<double>(s.t)};
}

// The state of `values` (raw logits, scale c) fed one element at a time (block <= 1, `update`)
// or, as the CPU kernels do, in blocks: rescale to the block's max, then accumulate each element.
template <class A>
State3 state_of(const std::vector<double>& values, int64_t block, bool entropy, double c_in) {
  auto st = fastdpo::state_init<A>();
  const A c = static_cast<A>(c_in);
  const int64_t n = static_cast<int64_t>(values.size());
  if (block <= 1) {
    for (double v : values) {
      if (entropy) fastdpo::update<true>(st, static_cast<A>(v), c);
      else fastdpo::update<false>(st, static_cast<A>(v), c);
    }
    return to_tuple(st);
  }
  for (int64_t b = 0; b < n; b += block) {
    const int64_t e = std::min(n, b + block);
    A m = A(-INFINITY);
    for (int64_t i = b; i < e; ++i) m = fastdpo::Math<A>::max(static_cast<A>(values[i]), m);
    m = fastdpo::Math<A>::max(m, st.m);
    if (entropy) fastdpo::rescale<true>(st, m, c);
    else fastdpo::rescale<false>(st, m, c);
    const auto sh = fastdpo::make_shift(fastdpo::ref_point(st.m), c);
    for (int64_t i = b; i < e; ++i) {
      const A d = fastdpo::scaled_diff(static_cast<A>(values[i]), sh, A(0));
      if (entropy) fastdpo::accumulate<true>(st.s, st.t, d);
      else fastdpo::accumulate<false>(st.s, st.t, d);
    }
  }
  return to_tuple(st);
}

template <class A>
State3 merge_of(const State3& a, const State3& b, bool entropy, double c) {
  const auto sa = from_tuple<A>(a), sb = from_tuple<A>(b);
  return entropy ? to_tuple(fastdpo::merge<true>(sa, sb, static_cast<A>(c)))
                 : to_tuple(fastdpo::merge<false>(sa, sb, static_cast<A>(c)));
}

// (row_max, log_sum, entropy)
template <class A>
State3 finalize_of(const State3& s) {
  const auto r = fastdpo::finalize(from_tuple<A>(s));
  return {static_cast<double>(r.row_max), static_cast<double>(r.log_sum),
          static_cast<double>(r.entropy)};
}

template <class A>
double grad_of(double x, double c, double g, double g_ent, double row_max, double log_sum,
               double ent, bool is_label) {
  const auto k = fastdpo::grad_coeffs<A>(A(g), A(g_ent), A(row_max), A(log_sum), A(ent), A(c));
  A v = g_ent != 0.0 ? fastdpo::grad_element<true>(A(x), k) : fastdpo::grad_element<false>(A(x), k);
  if (is_label) v = v + fastdpo::label_grad(A(g), A(c));
  return static_cast<double>(v);
}

bool is_f64(const std::string& dtype) {
  TORCH_CHECK(dtype == "float32" || dtype == "float64", "dtype must be 'float32' or 'float64'");
  return dtype == "float64";
}

fastdpo::DType storage_dtype(const std::string& dtype) {
  if (dtype == "bfloat16") return fastdpo::DType::kBFloat16;
  if (dtype == "float16") return fastdpo::DType::kFloat16;
  TORCH_CHECK(false, "dtype must be 'bfloat16' or 'float16', got '", dtype, "'");
}

std::vector<float> exp_avx2(const std::vector<float>& x) {
  TORCH_CHECK(fastdpo::cpu::avx2_supported(), "exp_avx2: this CPU has no AVX2/FMA/F16C");
  std::vector<float> out(x.size());
  fastdpo::cpu::exp_avx2(x.data(), out.data(), static_cast<int64_t>(x.size()));
  return out;
}

std::vector<float> round_trip(const std::vector<float>& x, const std::string& dtype,
                              const std::string& kernel) {
  std::vector<float> out(x.size());
  const int64_t n = static_cast<int64_t>(x.size());
  if (kernel == "avx2") {
    TORCH_CHECK(fastdpo::cpu::avx2_supported(), "round_trip: this CPU has no AVX2/FMA/F16C");
    fastdpo::cpu::round_trip_avx2(x.data(), out.data(), n, storage_dtype(dtype));
  } else {
    TORCH_CHECK(kernel == "generic", "kernel must be 'avx2' or 'generic'");
    fastdpo::cpu::round_trip_generic(x.data(), out.data(), n, storage_dtype(dtype));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "fastdpo native kernels: importing registers native_logps_fwd/bwd (CPU, CUDA if built)";
  m.def("has_cuda", [] {
#ifdef FASTDPO_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled in.");
  m.def("avx2_supported", &fastdpo::cpu::avx2_supported, "Whether this CPU runs the AVX2 kernels.");
  m.def("cpu_kernel", &fastdpo::cpu_kernel, "The CPU kernels in use: 'avx2' or 'generic'.");
  m.def("set_cpu_kernel", &fastdpo::set_cpu_kernel, py::arg("name"),
        "'generic' pins the scalar kernels (tests), 'auto' picks by CPU features.");

  // Header math (csrc/include/fastdpo), for tests against float64 ("float64" instantiates the same
  // templates in double; no kernel runs in fp64).
  m.def("state_of", [](const std::vector<double>& values, int64_t block, bool entropy,
                       const std::string& dtype, double inv_temp) {
    return is_f64(dtype) ? state_of<double>(values, block, entropy, inv_temp)
                         : state_of<float>(values, block, entropy, inv_temp);
  }, py::arg("values"), py::arg("block") = 1, py::arg("entropy") = true,
        py::arg("dtype") = "float32", py::arg("inv_temp") = 1.0);
  m.def("merge", [](const State3& a, const State3& b, bool entropy, const std::string& dtype,
                    double inv_temp) {
    return is_f64(dtype) ? merge_of<double>(a, b, entropy, inv_temp)
                         : merge_of<float>(a, b, entropy, inv_temp);
  }, py::arg("a"), py::arg("b"), py::arg("entropy") = true, py::arg("dtype") = "float32",
        py::arg("inv_temp") = 1.0);
  m.def("finalize", [](const State3& s, const std::string& dtype) {
    return is_f64(dtype) ? finalize_of<double>(s) : finalize_of<float>(s);
  }, py::arg("state"), py::arg("dtype") = "float32",
        "(row_max, log_sum, entropy) of a state (m, s, t).");
  m.def("grad_element", [](double x, double inv_temp, double g, double g_ent, double row_max,
                           double log_sum, double ent, bool is_label, const std::string& dtype) {
    return is_f64(dtype) ? grad_of<double>(x, inv_temp, g, g_ent, row_max, log_sum, ent, is_label)
                         : grad_of<float>(x, inv_temp, g, g_ent, row_max, log_sum, ent, is_label);
  }, py::arg("x"), py::arg("inv_temp"), py::arg("g"), py::arg("g_ent"), py::arg("row_max"),
        py::arg("log_sum"), py::arg("entropy"), py::arg("is_label"), py::arg("dtype") = "float32");
  m.def("linear_cpu_plan", &fastdpo::linear_cpu_plan, py::arg("V"), py::arg("H"),
        "(tile rows, tile columns, L2 bytes, L3 bytes) of the CPU fused LM head.");
  m.def("linear_cpu_bwd_plan", &fastdpo::linear_cpu_bwd_plan, py::arg("N"), py::arg("V"),
        py::arg("H"), py::arg("itemsize"), py::arg("batch_invariant") = false,
        py::arg("softcap") = false,
        "(d_hidden groups, token block rows, bytes of each thread's buffers) of the CPU fused "
        "LM head's backward.");
  m.def("linear_keep_numel", &fastdpo::linear_keep_numel, py::arg("N"), py::arg("V"),
        py::arg("H"), py::arg("batch_invariant") = false,
        "fp32 floats of the kept-logits buffer of native_linear_keep_fwd for N rows.");
  m.def("exp_avx2", &exp_avx2, py::arg("x"));
  m.def("round_trip", &round_trip, py::arg("x"), py::arg("dtype"), py::arg("kernel"));
}
