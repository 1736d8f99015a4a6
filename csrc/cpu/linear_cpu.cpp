// The native CPU fused LM head (native_linear_logps_fwd / _bwd, contract in fastdpo/ops.py): the
// chunk loops of fastdpo/torch_backend/linear.py in C++, each as ONE parallel region.
//
// A Python loop of GEMM + row kernel per tile opens two short parallel regions per tile (~1,300 a
// step at N = 2048, V = 128k), each ending in a barrier: when one core is busy with another
// process, every barrier waits for the descheduled thread. Here each loop is one region; threads
// take whole work items from an atomic counter (dynamic scheduling, so a thread that loses its
// core just takes fewer items) and run the item's GEMMs single-threaded (at::mm inside a parallel
// region does not spawn threads of its own) plus the row kernels (row_driver.h) on buffers of
// their own, allocated once per thread and call.
//
// Forward: items are (vocabulary chunk, token tile) pairs, token tiles fastest (threads on the
// same chunk share its weight rows in L3). Each tile's row statistics go to a (chunks x N) table,
// merged per row at the end in chunk order (combine.h): the result depends on the tile shapes
// only, not on which thread ran what.
// Backward: items are groups of consecutive vocabulary chunks. The thread holding a group owns
// its d_weight / d_bias rows (written once, no conflict) and accumulates the group's share of
// d_hidden in fp32 in the group's own (rows x H) buffer; the groups' buffers are summed in group
// order at the end. bf16/fp16 inputs are converted to fp32 per tile (CPU GEMMs in bf16 round
// their result to bf16). The groups' buffers get the part of the memory budget that the threads'
// own buffers (cpu::scratch_bytes) leave; when they would exceed it, tokens are taken in blocks;
// d_weight then accumulates in place across blocks when it is fp32, and is otherwise computed in
// a second sweep over all tokens (every gradient is still rounded once).
//
// batch_invariant: every token tile is padded to the full Nc rows and the number of groups is
// fixed, so no GEMM shape or reduction order depends on the batch or the thread count.
//
// Frozen head (native_linear_frozen_fwd, the weight needs no gradient): items are token tiles
// (with fewer tiles than threads, groups of a tile's vocabulary chunks), each one sweep that
// forms the forward's per-chunk statistics (the same tiles and the same bits, so a frozen policy
// and its reference cancel exactly) and accumulates the softmax-weighted weight rows, so each
// token's d logp / d hidden comes out with its log-prob: two GEMMs per tile and chunk, no second
// pass (see frozen_rows). A bf16/fp16 weight is converted chunk by chunk in the thread's buffer,
// never whole (that was 2x the head).
//
// Kept chunk (native_linear_keep_fwd / _bwd, a trainable head under linear_dpo_loss, whose pair
// gradients need the chunk's log-probs before any gradient): the forward above writes each
// tile's logits into the caller's buffer (one fixed slot per chunk and token tile) instead of the
// thread's; the backward above reads them from there instead of recomputing (the softcap's tanh
// taken back as x / softcap), so the chunk costs 3 GEMMs. Its token blocks start on tile bounds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "cpu/linear_plan.h"
#include "cpu/logps_cpu.h"
#include "fastdpo/combine.h"
#include "fastdpo/online_softmax.h"
#include "fastdpo/params.h"
#include "ops.h"

namespace fastdpo {
namespace {

constexpr int64_t kMinBudget = int64_t{16} << 20;  // as MIN_BUDGET of the Python loop
constexpr double kBudgetFraction = 0.05;           // of the (N, V) logits
constexpr int64_t kInvariantGroups = 8;            // d_hidden groups under batch_invariant

struct Head {
  at::Tensor hidden, weight, bias32, labels;  // labels contiguous; bias fp32 or undefined
  int64_t N = 0, H = 0, V = 0;
  int64_t ignore_index = -100, vocab_start = 0, vocab_total = 0;
  float c = 1.0f;             // 1 / temperature
  double logit_scale = 1.0, softcap = 0.0;
  bool invariant = false, avx2 = false;
  cpu::TileShape tile{};
  at::Tensor keep;  // kept logits (native_linear_keep_*): one fixed slot per (chunk, token tile)
};

// Buffers of one thread, allocated (and first touched) by that thread.
struct Scratch {
  at::Tensor x, tanh, h, w, dw, tmp, acc;
  std::vector<float> fw;  // frozen head: a bf16/fp16 label row in fp32
  int64_t w_chunk = -1;  // chunk whose fp32 weight rows `w` holds
};

at::Tensor f32_buffer(int64_t rows, int64_t cols) {
  return at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

// fn(scratch, item) for items [0, n) in one parallel region with dynamic scheduling. The caller's
// thread-local state (grad mode, profiler) travels to the worker threads.
template <class F>
void run_items(int64_t n, std::vector<Scratch>& slots, const F& fn) {
  if (n <= 0) return;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  if (static_cast<int64_t>(slots.size()) < threads) slots.resize(threads);
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState state;
  at::parallel_for(0, threads, 1, [&](int64_t slot, int64_t /*end*/) {
    at::ThreadLocalStateGuard guard(state);
    c10::AutoGradMode no_grad(false);
    Scratch& s = slots[slot];
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(s, i);
  });
}

void check_float_input(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
              ": the native backend takes fp32/bf16/fp16 ", name, ", got ", st,
              st == at::kDouble ? " (the torch backend takes float64)" : "");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// The machine's caches, read once: every tile plan of the process (kernels, kept buffers, the
// plans tests and the bench ask for) comes from the same sizes.
const cpu::CacheSizes& machine_caches() {
  static const cpu::CacheSizes caches = cpu::cache_sizes();
  return caches;
}

Head make_head(const at::Tensor& hidden, const at::Tensor& weight,
               const std::optional<at::Tensor>& bias, const at::Tensor& labels,
               int64_t ignore_index, double temperature, double logit_scale, double softcap,
               int64_t vocab_start, int64_t vocab_total, bool batch_invariant, const char* op) {
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be (N, H), got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), op,
              ": weight must be (V, H) with H = ", hidden.size(1), ", got shape ", weight.sizes());
  // no vocabulary chunk would run: the outputs would be left uninitialised
  TORCH_CHECK_VALUE(weight.size(0) > 0, op, ": weight has an empty vocabulary dimension (V = 0)");
  check_float_input(hidden, op, "hidden");
  check_float_input(weight, op, "weight");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), op,
              ": labels must have shape (N,) = (", hidden.size(0), "), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK(vocab_start >= 0, op, ": vocab_start must be >= 0, got ", vocab_start);
  TORCH_CHECK(vocab_total >= 0, op, ": vocab_total must be >= 0, got ", vocab_total);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op,
              ": temperature must be a finite positive number, got ", temperature);
  const float c = static_cast<float>(1.0 / temperature);
  TORCH_CHECK(std::isfinite(c) && c > 0.0f, op, ": temperature ", temperature,
              " is outside the range fp32 kernels can scale by");
  TORCH_CHECK(std::isfinite(logit_scale), op, ": logit_scale must be finite, got ", logit_scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op,
              ": softcap must be a finite number >= 0 (0 = off), got ", softcap);
  Head hd;
  hd.hidden = hidden.detach();
  hd.weight = weight.detach();
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must have shape (V,) = (", weight.size(0), "), got ", bias->sizes());
    check_float_input(*bias, op, "bias");
    hd.bias32 = bias->detach().to(at::kFloat).contiguous();
  }
  hd.labels = labels.contiguous();
  hd.N = hidden.size(0);
  hd.H = hidden.size(1);
  hd.V = weight.size(0);
  hd.ignore_index = ignore_index;
  hd.vocab_start = vocab_start;
  hd.vocab_total = vocab_total;
  hd.c = c;
  hd.logit_scale = logit_scale;
  hd.softcap = softcap;
  hd.invariant = batch_invariant;
  hd.avx2 = cpu_kernel() == "avx2";
  hd.tile = cpu::tile_shape(hd.V, hd.H, machine_caches());
  return hd;
}

// Rows of `hd` restricted to the labelled ones: nullopt when every row has a label.
std::optional<at::Tensor> labelled_rows(const Head& hd) {
  const at::Tensor active = hd.labels.ne(hd.ignore_index);
  const int64_t n = active.sum().item<int64_t>();  // CPU: no device synchronisation
  if (n == hd.N) return std::nullopt;
  return at::nonzero(active).squeeze(1);
}

int64_t chunks_of(const Head& hd) { return (hd.V + hd.tile.cols - 1) / hd.tile.cols; }
// Rows of a token tile for N tokens. Under batch invariance the plan's, every tile padded to it.
// Else the fewest tiles of at most the plan's rows, balanced (only the last one short, by fewer
// rows than there are tiles); nothing depends on the thread count. Every op of a call takes
// this rule, so their tiles (and the bits of each tile's GEMM) agree.
int64_t tile_rows_for(const cpu::TileShape& t, int64_t N, bool invariant) {
  if (invariant) return t.rows;
  if (N <= 1) return 1;
  const int64_t tiles = (N + t.rows - 1) / t.rows;
  return (N + tiles - 1) / tiles;
}
int64_t tile_rows_of(const Head& hd) { return tile_rows_for(hd.tile, hd.N, hd.invariant); }

// Floats of the kept-logits buffer for up to N tokens: one slot of (tile rows x tile.cols) per
// chunk and token tile (keep_slot's layout), then one float, the forward's tile rows, which the
// backward checks (its rows, so its tiles, must be the forward's). Without batch invariance the
// tiles of n <= N tokens span fewer than n + ceil(n / 64) rows (tile_rows_for), a bound that
// grows with N: a buffer sized for a batch's largest chunk serves each of its chunks.
int64_t keep_numel(const cpu::TileShape& t, int64_t N, int64_t V, bool invariant) {
  if (N <= 0 || V <= 0) return 0;
  const int64_t chunks = (V + t.cols - 1) / t.cols;
  const int64_t rows = invariant ? (N + t.rows - 1) / t.rows * t.rows : N + (N + 63) / 64;
  return chunks * rows * t.cols + 1;
}

LabelsView labels_at(const Head& hd, int64_t n0) {
  LabelsView l;
  l.is_int64 = hd.labels.scalar_type() == at::kLong;
  l.data = static_cast<const char*>(hd.labels.data_ptr()) + n0 * hd.labels.element_size();
  l.stride_b = 0;
  l.stride_t = 1;
  return l;
}

// fp32 hidden rows [n0, n0 + n) of a tile with `rows` rows (zero padding below n).
at::Tensor hidden_tile(const Head& hd, Scratch& s, int64_t n0, int64_t n, int64_t rows) {
  const at::Tensor src = hd.hidden.narrow(0, n0, n);
  if (!hd.invariant && rows == n && src.scalar_type() == at::kFloat) return src;
  if (!s.h.defined()) s.h = f32_buffer(std::max(rows, hd.tile.rows), hd.H);
  at::Tensor h = s.h.narrow(0, 0, rows);
  h.narrow(0, 0, n).copy_(src);
  if (rows > n) h.narrow(0, n, rows - n).zero_();
  return h;
}

// fp32 weight rows of chunk v (converted once per thread and chunk).
at::Tensor weight_chunk(const Head& hd, Scratch& s, int64_t v, int64_t v0, int64_t vc) {
  const at::Tensor src = hd.weight.narrow(0, v0, vc);
  if (src.scalar_type() == at::kFloat) return src;
  if (!s.w.defined()) s.w = f32_buffer(hd.tile.cols, hd.H);
  at::Tensor w = s.w.narrow(0, 0, vc);
  if (s.w_chunk != v) {
    w.copy_(src);
    s.w_chunk = v;
  }
  return w;
}

// The kept buffer's last float of this call: the forward's tile rows (keep_numel).
float& keep_marker(const Head& hd) {
  return hd.keep.data_ptr<float>()[keep_numel(hd.tile, hd.N, hd.V, hd.invariant) - 1];
}

// Slot of the kept logits of chunk v and token tile t (tile_rows_of x tile.cols floats each):
// the forward writes it, the backward turns it into d logits in place.
// Nc: the call's tile rows (tile_rows_of, taken once by the caller's thread).
at::Tensor keep_slot(const Head& hd, int64_t Nc, int64_t v, int64_t t, int64_t rows, int64_t vc) {
  const int64_t tiles = (hd.N + Nc - 1) / Nc;
  return hd.keep.narrow(0, (v * tiles + t) * Nc * hd.tile.cols, rows * vc).view({rows, vc});
}

// The transformed logits (before the temperature) of a tile, in the thread's buffer (or `dest`);
// with softcap the tanh is kept for the backward's chain rule. As
// fastdpo.rows.transform_logits_.
at::Tensor logits_tile(const Head& hd, Scratch& s, const at::Tensor& h, const at::Tensor& w,
                       int64_t v0, int64_t vc, bool keep_tanh, at::Tensor dest = at::Tensor()) {
  const int64_t rows = h.size(0);
  if (!dest.defined() && !s.x.defined()) s.x = at::empty({hd.tile.rows * hd.tile.cols}, at::kFloat);
  at::Tensor x = dest.defined() ? dest : s.x.narrow(0, 0, rows * vc).view({rows, vc});
  at::mm_out(x, h, w.t());
  if (hd.bias32.defined()) x.add_(hd.bias32.narrow(0, v0, vc));
  if (hd.softcap != 0.0) {
    x.mul_(hd.logit_scale / hd.softcap).tanh_();
    if (keep_tanh) {
      if (!s.tanh.defined()) s.tanh = at::empty({hd.tile.rows * hd.tile.cols}, at::kFloat);
      s.tanh.narrow(0, 0, rows * vc).view({rows, vc}).copy_(x);
    }
    x.mul_(hd.softcap);
  } else if (hd.logit_scale != 1.0) {
    x.mul_(hd.logit_scale);
  }
  return x;
}

// ------------------------------------------------------------------ per-block row statistics
// Every pass forms a row's statistics over one tile's block of the vocabulary with block_stats
// and merges the blocks with finish_row, so the forward (reference, kept chunk) and the frozen
// head's pass give the same bits for the same rows and tiles.

struct BlockParts {  // per-block statistics: block k of row slot r at k * stride + r
  float *logp, *row_max, *log_sum, *entropy;  // entropy null unless wanted
  int64_t stride;
};

float block_max(const Head& hd, const float* x, int64_t n) {
  return hd.avx2 ? cpu::block_max_avx2(x, n) : cpu::block_max_generic(x, n);
}

// One row's statistics over its block of vc logits x, whose max is m (block_max), into slot `at`
// of `o`, as the row kernels' contract (lab classified over the block's columns); returns the
// block's sum of exp((x - ref(m)) c). With `out` (may be x), each term times out_scale is
// written there: the frozen head's softmax weights.
float block_stats(const Head& hd, const float* x, int64_t vc, float m, const LabelInfo& lab,
                  const BlockParts& o, int64_t at, float* out = nullptr, float out_scale = 1.0f) {
  const float x_label = lab.kind == LabelKind::kLocal ? x[lab.local] : 0.0f;  // before `out`
  float t = 0.0f;
  float* tp = o.entropy ? &t : nullptr;
  const float ref = ref_point(m);
  const float sum = hd.avx2 ? cpu::block_exp_avx2(x, out, vc, ref, hd.c, tp, out_scale)
                            : cpu::block_exp_generic(x, out, vc, ref, hd.c, tp, out_scale);
  const RowStats<float> r = finalize(SoftmaxState<float>{m, sum, t});
  o.row_max[at] = r.row_max;
  o.log_sum[at] = r.log_sum;
  if (o.entropy) o.entropy[at] = r.entropy;
  o.logp[at] = label_logp(lab.kind, x_label, r, hd.c);
  return sum;
}

// A row's statistics from its K blocks (slot r of `p`): the block's own when K = 1, else
// combine_parts in block order. lab: the row's label over the whole vocabulary.
Combined<float> finish_row(const Head& hd, const BlockParts& p, int64_t r, int64_t K,
                           const LabelInfo& lab) {
  if (K == 1) return {p.logp[r], p.row_max[r], p.log_sum[r], p.entropy ? p.entropy[r] : 0.0f};
  const int64_t holder = lab.kind == LabelKind::kLocal ? lab.local / hd.tile.cols : -1;
  return combine_parts(p.logp + r, p.row_max + r, p.log_sum + r,
                       p.entropy ? p.entropy + r : nullptr, p.stride, K, holder,
                       lab.kind == LabelKind::kInvalid, hd.c);
}

using Outs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outs forward_rows(const Head& hd, bool with_entropy) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t N = hd.N, V = hd.V, K = chunks_of(hd), Vc = hd.tile.cols;
  const int64_t Nc = tile_rows_of(hd), tiles = (N + Nc - 1) / Nc;
  at::Tensor logp = at::empty({N}, f32), row_max = at::empty({N}, f32);
  at::Tensor log_sum = at::empty({N}, f32);
  at::Tensor ent = with_entropy ? at::empty({N}, f32) : at::empty({0}, f32);
  // per-chunk statistics (the outputs themselves when one chunk holds the whole vocabulary)
  at::Tensor st = K == 1 ? at::Tensor() : at::empty({with_entropy ? 4 : 3, K, N}, f32);
  float* t_logp = K == 1 ? logp.data_ptr<float>() : st[0].data_ptr<float>();
  float* t_max = K == 1 ? row_max.data_ptr<float>() : st[1].data_ptr<float>();
  float* t_sum = K == 1 ? log_sum.data_ptr<float>() : st[2].data_ptr<float>();
  float* t_ent = !with_entropy ? nullptr : (K == 1 ? ent.data_ptr<float>() : st[3].data_ptr<float>());
  const BlockParts parts{t_logp, t_max, t_sum, t_ent, N};
  std::vector<Scratch> slots;
  run_items(K * tiles, slots, [&](Scratch& s, int64_t item) {
    const int64_t v = item / tiles, n0 = (item % tiles) * Nc;
    const int64_t v0 = v * Vc, vc = std::min(Vc, V - v0), n = std::min(Nc, N - n0);
    const at::Tensor h = hidden_tile(hd, s, n0, n, hd.invariant ? Nc : n);
    const at::Tensor dest =
        hd.keep.defined() ? keep_slot(hd, Nc, v, n0 / Nc, h.size(0), vc) : at::Tensor();
    const at::Tensor x =
        logits_tile(hd, s, h, weight_chunk(hd, s, v, v0, vc), v0, vc, false, dest);
    const LabelRule rule{hd.ignore_index, hd.vocab_start + v0, hd.vocab_total};
    const float* xp = x.data_ptr<float>();
    for (int64_t r = 0; r < n; ++r) {
      const int64_t at = v * N + n0 + r;
      const LabelInfo lab = classify_label(labels_at(hd, n0 + r).at(0, 0), rule, vc);
      if (lab.kind == LabelKind::kIgnored) {
        t_logp[at] = t_max[at] = t_sum[at] = 0.0f;
        if (t_ent) t_ent[at] = 0.0f;
        continue;
      }
      const float* xr = xp + r * vc;
      block_stats(hd, xr, vc, block_max(hd, xr, vc), lab, parts, at);
    }
  });
  if (K > 1) {
    float* o_logp = logp.data_ptr<float>();
    float* o_max = row_max.data_ptr<float>();
    float* o_sum = log_sum.data_ptr<float>();
    float* o_ent = with_entropy ? ent.data_ptr<float>() : nullptr;
    const LabelRule rule{hd.ignore_index, hd.vocab_start, hd.vocab_total};
    at::parallel_for(0, N, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const LabelInfo lab = classify_label(labels_at(hd, r).at(0, 0), rule, V);
        if (lab.kind == LabelKind::kIgnored) {
          o_logp[r] = o_max[r] = o_sum[r] = 0.0f;
          if (o_ent) o_ent[r] = 0.0f;
          continue;
        }
        const Combined<float> out = finish_row(hd, parts, r, K, lab);
        o_logp[r] = out.logp;
        o_max[r] = out.row_max;
        o_sum[r] = out.log_sum;
        if (o_ent) o_ent[r] = out.entropy;
      }
    });
  }
  return {logp, row_max, log_sum, ent};
}

// ----------------------------------------------------------------------------------- backward

struct RowGrads {  // fp32 contiguous (N,) row tensors of the backward
  at::Tensor grad_logp, grad_entropy, row_max, log_sum, entropy;  // the *entropy ones optional
};

RowScalars scalars_at(const at::Tensor& t, int64_t n0) {
  RowScalars r;
  r.data = t.defined() ? t.data_ptr<float>() + n0 : nullptr;
  r.stride_b = 0;
  r.stride_t = 1;
  return r;
}

struct SweepOut {
  at::Tensor d_h, d_w, d_b;  // undefined where this sweep does not compute them
};

// One pass over the tiles of tokens [s0, s0 + ns): d_hidden of those rows (when d.d_h), and
// d_weight / d_bias contributions (added to them when fp32 and `accumulate`, else written).
void sweep_block(const Head& hd, const RowGrads& g, int64_t s0, int64_t ns, int64_t groups,
                 const SweepOut& d, bool accumulate, at::Tensor& dh_acc) {
  const int64_t V = hd.V, H = hd.H, K = chunks_of(hd), Vc = hd.tile.cols;
  const bool kept = hd.keep.defined();  // the forward's tiles: blocks start on their bounds
  const int64_t Nc = tile_rows_for(hd.tile, kept ? hd.N : ns, hd.invariant);
  TORCH_INTERNAL_ASSERT(!kept || s0 % Nc == 0, "a kept block starts inside a tile");
  const bool want_h = d.d_h.defined(), want_w = d.d_w.defined(), want_b = d.d_b.defined();
  const bool w_direct = want_w && d.d_w.scalar_type() == at::kFloat;
  const bool b_direct = want_b && d.d_b.scalar_type() == at::kFloat;
  TORCH_INTERNAL_ASSERT(accumulate ? (!want_w || w_direct) && (!want_b || b_direct) : true);
  const int64_t items = want_h ? groups : K;
  std::vector<Scratch> slots;
  run_items(items, slots, [&](Scratch& s, int64_t item) {
    const int64_t c0 = want_h ? item * K / groups : item;
    const int64_t c1 = want_h ? (item + 1) * K / groups : item + 1;
    at::Tensor dh_g;
    if (want_h) {
      dh_g = dh_acc[item];
      dh_g.zero_();
    }
    for (int64_t v = c0; v < c1; ++v) {
      const int64_t v0 = v * Vc, vc = std::min(Vc, V - v0);
      const at::Tensor w = weight_chunk(hd, s, v, v0, vc);
      at::Tensor dw, db;
      if (want_w) {
        if (w_direct) {
          dw = d.d_w.narrow(0, v0, vc);
        } else {
          if (!s.dw.defined()) s.dw = f32_buffer(Vc, H);
          dw = s.dw.narrow(0, 0, vc);
          dw.zero_();
        }
      }
      if (want_b) db = at::zeros({vc}, at::kFloat);
      for (int64_t n0 = s0; n0 < s0 + ns; n0 += Nc) {
        const int64_t n = std::min(Nc, s0 + ns - n0), rows = hd.invariant ? Nc : n;
        const at::Tensor h = hidden_tile(hd, s, n0, n, rows);
        at::Tensor x;
        if (kept) {
          x = keep_slot(hd, Nc, v, n0 / Nc, rows, vc);
          if (hd.softcap != 0.0) {  // the tanh of the chain rule, from the kept logits
            if (!s.tanh.defined()) s.tanh = at::empty({hd.tile.rows * hd.tile.cols}, at::kFloat);
            s.tanh.narrow(0, 0, rows * vc).view({rows, vc}).copy_(x).mul_(1.0 / hd.softcap);
          }
        } else {
          x = logits_tile(hd, s, h, w, v0, vc, hd.softcap != 0.0);
        }
        LogpsBwdParams p;
        p.dtype = DType::kFloat32;
        p.logits = x.data_ptr<float>();
        p.grad_logits = x.data_ptr<float>();  // in place: each logit is read before written
        p.rows.B = 1;
        p.rows.T = n;
        p.rows.V = vc;
        p.rows.stride_b = rows * vc;
        p.rows.stride_t = vc;
        p.grad_stride_b = rows * vc;
        p.grad_stride_t = vc;
        p.labels = labels_at(hd, n0);
        p.rule = LabelRule{hd.ignore_index, hd.vocab_start + v0, hd.vocab_total};
        p.inv_temp = hd.c;
        p.grad_logp = scalars_at(g.grad_logp, n0);
        p.row_max = scalars_at(g.row_max, n0);
        p.log_sum = scalars_at(g.log_sum, n0);
        if (g.grad_entropy.defined()) {
          p.grad_entropy = scalars_at(g.grad_entropy, n0);
          p.entropy = scalars_at(g.entropy, n0);
        }
        if (hd.avx2) cpu::logps_bwd_rows_avx2(p, 0, n);
        else cpu::logps_bwd_rows_generic(p, 0, n);
        if (rows > n) x.narrow(0, n, rows - n).zero_();  // padding rows: no gradient
        if (hd.softcap != 0.0) {  // as fastdpo.rows.transform_grad_
          at::Tensor t = s.tanh.narrow(0, 0, rows * vc).view({rows, vc});
          x.mul_(t.mul_(t).neg_().add_(1.0));
        }
        if (hd.logit_scale != 1.0) x.mul_(hd.logit_scale);
        if (want_h) {  // the product apart, then added: the same rounding in every tile
          if (!s.tmp.defined()) s.tmp = f32_buffer(hd.tile.rows, H);
          at::Tensor tmp = s.tmp.narrow(0, 0, rows);
          at::mm_out(tmp, x, w);
          dh_g.narrow(0, n0 - s0, n).add_(tmp.narrow(0, 0, n));
        }
        if (want_w) dw.addmm_(x.narrow(0, 0, n).t(), h.narrow(0, 0, n));
        if (want_b) db.add_(x.narrow(0, 0, n).sum(0));
      }
      if (want_w && !w_direct) d.d_w.narrow(0, v0, vc).copy_(dw);
      if (want_b) {
        at::Tensor out = d.d_b.narrow(0, v0, vc);
        if (b_direct) out.add_(db);
        else out.copy_(db);
      }
    }
  });
  if (want_h) {  // the groups' shares, summed in group order
    float* acc = dh_acc.data_ptr<float>();
    const int64_t plane = dh_acc.size(1) * H;
    at::parallel_for(0, ns, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0 * H; i < r1 * H; ++i) {
        float sum = acc[i];
        for (int64_t k = 1; k < groups; ++k) sum += acc[k * plane + i];
        acc[i] = sum;
      }
    });
    d.d_h.narrow(0, s0, ns).copy_(dh_acc[0].narrow(0, 0, ns));
  }
}

// Groups of vocabulary chunks and token blocks of the backward, within the memory budget.
struct BwdPlan {
  int64_t groups, block_rows;
};

constexpr int64_t kMinGroupPart = int64_t{4} << 20;  // the group buffers' share, at least

// `scratch`: bytes of one thread's own buffers (cpu::scratch_bytes). The d_hidden group buffers
// get half the budget, or less when the threads' buffers take more than the other half (many
// threads at a large H); at least one token tile per group and one group per thread, so at many
// threads x a large H the floor itself can pass the budget (linear_cpu_bwd_plan reports it).
BwdPlan bwd_plan(int64_t N, int64_t V, int64_t H, int64_t itemsize, int64_t chunks,
                 int64_t tile_rows, bool invariant, bool want_h, int64_t scratch) {
  if (!want_h) return {chunks, N};
  const int64_t budget = std::max<int64_t>(
      kMinBudget, static_cast<int64_t>(kBudgetFraction * static_cast<double>(N) * V * itemsize));
  const int64_t threads = at::get_num_threads();
  const int64_t part = std::max(kMinGroupPart, std::min(budget / 2, budget - threads * scratch));
  const int64_t row_bytes = 4 * H;
  // many groups: a thread that loses its core holds up at most one short item at the end
  int64_t groups = invariant ? kInvariantGroups : std::max<int64_t>(16, 4 * threads);
  if (!invariant) {  // fewer groups (still >= threads) before splitting the tokens
    groups = std::min(groups, std::max(threads, part / std::max<int64_t>(1, N * row_bytes)));
  }
  // a few groups, each one item: a multiple of the threads, or one thread idles at the end
  // (3 groups on 2 threads leave one for the last third of the sweep)
  if (!invariant && groups > threads && groups < 4 * threads) groups = groups / threads * threads;
  groups = std::max<int64_t>(1, std::min(groups, chunks));
  int64_t rows = part / (groups * row_bytes);
  if (rows >= N) return {groups, N};
  rows = std::max(tile_rows, rows / tile_rows * tile_rows);
  return {groups, std::min(rows, N)};
}

// The buffers one thread of a backward sweep allocates.
cpu::ScratchNeeds bwd_needs(bool softcap, bool invariant, bool half_h, bool half_w, bool want_h,
                            bool half_dw) {
  cpu::ScratchNeeds n;
  n.softcap = softcap;
  n.copy_h = invariant || half_h;
  n.copy_w = half_w;
  n.copy_dw = half_dw;
  n.rows_h = want_h;
  return n;
}

int64_t bwd_scratch(const Head& hd, const SweepOut& d) {
  const bool half_dw = d.d_w.defined() && d.d_w.scalar_type() != at::kFloat;
  return cpu::scratch_bytes(
      hd.tile, hd.H,
      bwd_needs(hd.softcap != 0.0, hd.invariant, hd.hidden.scalar_type() != at::kFloat,
                hd.weight.scalar_type() != at::kFloat, d.d_h.defined(), half_dw));
}

BwdPlan bwd_plan(const Head& hd, const SweepOut& d) {
  // a kept backward reads the forward's tiles: its token blocks start on their bounds
  const int64_t tile_rows = hd.keep.defined() ? tile_rows_of(hd) : hd.tile.rows;
  return bwd_plan(hd.N, hd.V, hd.H, hd.hidden.element_size(), chunks_of(hd), tile_rows,
                  hd.invariant, d.d_h.defined(), bwd_scratch(hd, d));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_rows(const Head& hd, const RowGrads& g,
                                                             const SweepOut& d) {
  const bool want_h = d.d_h.defined();
  const bool want_wb = d.d_w.defined() || d.d_b.defined();
  const BwdPlan plan = bwd_plan(hd, d);
  at::Tensor dh_acc;
  if (want_h) dh_acc = at::empty({plan.groups, plan.block_rows, hd.H}, at::kFloat);
  const bool fp32_wb = (!d.d_w.defined() || d.d_w.scalar_type() == at::kFloat) &&
                       (!d.d_b.defined() || d.d_b.scalar_type() == at::kFloat);
  if (plan.block_rows >= hd.N || !want_h || !want_wb || fp32_wb) {
    for (int64_t s0 = 0; s0 < hd.N; s0 += plan.block_rows) {
      sweep_block(hd, g, s0, std::min(plan.block_rows, hd.N - s0), plan.groups, d,
                  plan.block_rows < hd.N, dh_acc);
    }
  } else {  // d_hidden block by block, then d_weight / d_bias over all tokens at once
    const SweepOut only_h{d.d_h, at::Tensor(), at::Tensor()};
    for (int64_t s0 = 0; s0 < hd.N; s0 += plan.block_rows) {
      sweep_block(hd, g, s0, std::min(plan.block_rows, hd.N - s0), plan.groups, only_h, false,
                  dh_acc);
    }
    dh_acc = at::Tensor();
    const SweepOut only_wb{at::Tensor(), d.d_w, d.d_b};
    sweep_block(hd, g, 0, hd.N, chunks_of(hd), only_wb, false, dh_acc);
  }
  return {d.d_h, d.d_w, d.d_b};
}

// ------------------------------------------------------------- frozen head (LoRA / PEFT)

// fp32 weight row `row` (the label's): in place when the weight is fp32, else converted into
// the thread's buffer.
const float* label_row(const Head& hd, Scratch& s, int64_t row, bool w_f32) {
  if (w_f32) return hd.weight.data_ptr<float>() + row * hd.H;
  s.fw.resize(hd.H);
  at::from_blob(s.fw.data(), {hd.H}, at::TensorOptions().dtype(at::kFloat))
      .copy_(hd.weight.select(0, row));
  return s.fw.data();
}

// Per token tile, one sweep over the vocabulary blocks: each row's statistics per block as the
// forward's (block_stats into a (blocks x N) table, merged by finish_row: the same bits as
// forward_rows on the same rows), and an fp32 accumulator acc (rows x H) of
// sum_j exp((x_j - M) c) a'_j w_j relative to the running max M, rescaled by exp((M_old - M_new) c)
// when M grows; a block whose own max is below M has its terms written times exp((max - M) c)
// (a'_j = 1 - tanh^2 with softcap, else 1). Each block costs the logits GEMM and the
// (weights x block) GEMM, both on the thread's L2-sized tile. At the end, with S the running
// sum of the same terms,
//     u = d logp / d hidden = (a'_label w_label - acc / S) * logit_scale * c,
// the chain rule of logp = (x_label - M) c - log S. Items are token tiles; a batch of fewer
// tiles than threads also splits each tile's blocks into groups, one item each, whose (M, S,
// acc) merge per row at the end (one acc buffer per item then). The statistics do not depend on
// the split.
Outs frozen_rows(const Head& hd, at::Tensor& u, bool with_entropy, at::Tensor& entropy) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t N = hd.N, H = hd.H, V = hd.V, K = chunks_of(hd), Vc = hd.tile.cols;
  const int64_t Nc = tile_rows_of(hd), tiles = (N + Nc - 1) / Nc;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // (under batch invariance one group: u's merge order must not depend on the batch)
  // (rounded down: items are equal, so tiles * G past a multiple of the threads adds a round)
  const int64_t G =
      hd.invariant || tiles == 0 ? 1 : std::max<int64_t>(1, std::min(K, threads / tiles));
  at::Tensor logp = at::empty({N}, f32), row_max = at::empty({N}, f32);
  at::Tensor log_sum = at::empty({N}, f32);
  float* o_logp = logp.data_ptr<float>();
  float* o_max = row_max.data_ptr<float>();
  float* o_sum = log_sum.data_ptr<float>();
  float* o_u = u.data_ptr<float>();
  float* o_ent = with_entropy ? entropy.data_ptr<float>() : nullptr;
  const at::Tensor st = at::empty({with_entropy ? 4 : 3, K, N}, f32);
  const BlockParts parts{st[0].data_ptr<float>(), st[1].data_ptr<float>(),
                         st[2].data_ptr<float>(), with_entropy ? st[3].data_ptr<float>() : nullptr,
                         N};
  // per item (tile x group) and row: the running max M and sum S; per row: the label's a'
  std::vector<float> run_m(tiles * G * Nc, -INFINITY), run_s(tiles * G * Nc, 0.0f);
  std::vector<float> label_g(N, 1.0f);
  const at::Tensor accs = G > 1 ? at::empty({tiles * G, Nc, H}, f32) : at::Tensor();
  const bool w_f32 = hd.weight.scalar_type() == at::kFloat;  // else converted per chunk
  const float c = hd.c, gscale = static_cast<float>(hd.logit_scale) * hd.c;
  const bool softcap = hd.softcap != 0.0;
  const LabelRule rule{hd.ignore_index, 0, V};
  // u of row i from its acc row `ar` and sum (the label's term, none for an invalid label)
  auto write_u = [&](Scratch& s, int64_t i, const float* ar, float sum) {
    float* ur = o_u + i * H;
    const LabelInfo lab = classify_label(labels_at(hd, i).at(0, 0), rule, V);
    if (lab.kind != LabelKind::kLocal) {  // an invalid label: no label term, as logps_bwd
      for (int64_t j = 0; j < H; ++j) ur[j] = (0.0f - ar[j] / sum) * gscale;
      return;
    }
    const float* wl = label_row(hd, s, lab.local, w_f32);
    const float g = label_g[i];
    for (int64_t j = 0; j < H; ++j) ur[j] = (g * wl[j] - ar[j] / sum) * gscale;
  };
  std::vector<Scratch> slots;
  run_items(tiles * G, slots, [&](Scratch& s, int64_t item) {
    const int64_t t = item / G, grp = item % G;
    const int64_t n0 = t * Nc, n = std::min(Nc, N - n0), rows = hd.invariant ? Nc : n;
    const at::Tensor h = hidden_tile(hd, s, n0, n, rows);
    if (G == 1 && !s.acc.defined()) s.acc = f32_buffer(Nc, H);
    at::Tensor acc = (G == 1 ? s.acc : accs.select(0, item)).narrow(0, 0, rows);
    acc.zero_();
    float* a = acc.data_ptr<float>();
    float* fm = run_m.data() + item * Nc;
    float* fs = run_s.data() + item * Nc;
    const int64_t v_begin = grp * K / G, v_end = (grp + 1) * K / G;
    for (int64_t v = v_begin; v < v_end; ++v) {
      const int64_t v0 = v * Vc, vc = std::min(Vc, V - v0);
      const at::Tensor w = weight_chunk(hd, s, v, v0, vc);
      at::Tensor x = logits_tile(hd, s, h, w, v0, vc, softcap);
      float* xp = x.data_ptr<float>();
      const float* tp = softcap ? s.tanh.data_ptr<float>() : nullptr;
      const LabelRule block_rule{hd.ignore_index, v0, V};
      for (int64_t r = 0; r < n; ++r) {
        float* xr = xp + r * vc;
        const LabelInfo lab = classify_label(labels_at(hd, n0 + r).at(0, 0), block_rule, vc);
        if (tp && lab.kind == LabelKind::kLocal) {
          const float tl = tp[r * vc + lab.local];
          label_g[n0 + r] = 1.0f - tl * tl;
        }
        const float mb = block_max(hd, xr, vc);
        const float m_old = fm[r], m_new = Math<float>::max(mb, m_old);
        const Shift<float> sh = make_shift(ref_point(m_new), c);
        if (m_new != m_old) {  // (m_old = -inf: scale 0, and nothing was added yet)
          const float alpha = Math<float>::exp(scaled_diff(m_old, sh, 0.0f));
          fs[r] *= alpha;
          if (v > v_begin) {
            float* ar = a + r * H;
            for (int64_t j = 0; j < H; ++j) ar[j] *= alpha;
          }
          fm[r] = m_new;
        }
        // the block's terms relative to M (a block of only -inf adds 0s, whatever M)
        const float k = mb == m_new ? 1.0f
                        : mb == -INFINITY ? 0.0f
                                          : Math<float>::exp(scaled_diff(mb, sh, 0.0f));
        fs[r] += k * block_stats(hd, xr, vc, mb, lab, parts, v * N + n0 + r, xr, k);
        if (tp) {  // times a'_j = 1 - tanh^2 while the row is in L1 (as rows.transform_grad_)
          const float* tr = tp + r * vc;
          for (int64_t j = 0; j < vc; ++j) xr[j] *= 1.0f - tr[j] * tr[j];
        }
      }
      if (rows > n) x.narrow(0, n, rows - n).zero_();  // padding rows add nothing
      acc.addmm_(x, w);
    }
    if (G == 1) {
      for (int64_t r = 0; r < n; ++r) write_u(s, n0 + r, a + r * H, fs[r]);
    }
  });
  const float* acc0 = G > 1 ? accs.data_ptr<float>() : nullptr;
  std::vector<Scratch> merge_slots(std::max<int64_t>(1, at::get_num_threads()));
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    Scratch& s = merge_slots[std::min<int64_t>(at::get_thread_num(),
                                               static_cast<int64_t>(merge_slots.size()) - 1)];
    std::vector<float> ar(G > 1 ? H : 0);
    for (int64_t i = r0; i < r1; ++i) {
      const LabelInfo lab = classify_label(labels_at(hd, i).at(0, 0), rule, V);
      const Combined<float> cb = finish_row(hd, parts, i, K, lab);
      if (o_ent) o_ent[i] = cb.entropy;
      o_max[i] = cb.row_max;
      o_sum[i] = cb.log_sum;
      o_logp[i] = cb.logp;
      if (G == 1) continue;
      // the groups' (M, S, acc) of row i, relative to the row's max over all groups
      const int64_t t = i / Nc, r = i % Nc;
      float M = -INFINITY;
      for (int64_t g = 0; g < G; ++g) M = Math<float>::max(run_m[(t * G + g) * Nc + r], M);
      const Shift<float> sh = make_shift(ref_point(M), c);
      std::fill(ar.begin(), ar.end(), 0.0f);
      float sum = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t at_ = (t * G + g) * Nc + r;
        const float alpha = Math<float>::exp(scaled_diff(run_m[at_], sh, 0.0f));
        sum += alpha * run_s[at_];
        const float* ag = acc0 + at_ * H;
        for (int64_t j = 0; j < H; ++j) ar[j] += alpha * ag[j];
      }
      write_u(s, i, ar.data(), sum);
    }
  });
  return {logp, row_max, log_sum, u};
}

at::Tensor rows_f32(const std::optional<at::Tensor>& t, const char* op, const char* name,
                    int64_t N) {
  if (!t.has_value() || !t->defined() || t->numel() == 0) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == N, op, ": ", name, " must have shape (", N,
              ",), got ", t->sizes());
  return t->detach().to(at::kFloat).contiguous();
}

}  // namespace

FwdResult linear_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                         int64_t ignore_index, double temperature, double logit_scale,
                         double softcap, int64_t vocab_start, int64_t vocab_total,
                         bool with_entropy, bool batch_invariant) {
  const char* op = "native_linear_logps_fwd";
  Head hd = make_head(hidden, weight, bias, labels, ignore_index, temperature, logit_scale,
                      softcap, vocab_start, vocab_total, batch_invariant, op);
  const auto sel = labelled_rows(hd);
  if (!sel.has_value()) return forward_rows(hd, with_entropy);
  const int64_t N = hd.N;
  hd.hidden = hd.hidden.index_select(0, *sel);
  hd.labels = hd.labels.index_select(0, *sel);
  hd.N = sel->size(0);
  auto out = forward_rows(hd, with_entropy);
  auto scatter = [&](const at::Tensor& t) {
    return at::zeros({N}, t.options()).index_copy_(0, *sel, t);
  };
  at::Tensor ent = std::get<3>(out);
  return {scatter(std::get<0>(out)), scatter(std::get<1>(out)), scatter(std::get<2>(out)),
          with_entropy ? scatter(ent) : ent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(
    const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& row_max, const at::Tensor& log_sum,
    const std::optional<at::Tensor>& entropy, int64_t ignore_index, double temperature,
    double logit_scale, double softcap, int64_t vocab_start, int64_t vocab_total,
    bool need_hidden_grad, bool need_weight_grad, bool need_bias_grad, bool batch_invariant) {
  const char* op = "native_linear_logps_bwd";
  Head hd = make_head(hidden, weight, bias, labels, ignore_index, temperature, logit_scale,
                      softcap, vocab_start, vocab_total, batch_invariant, op);
  const int64_t N = hd.N;
  RowGrads g;
  g.grad_logp = rows_f32(grad_logp, op, "grad_logp", N);
  TORCH_CHECK(g.grad_logp.defined() || N == 0, op, ": grad_logp is required");
  g.row_max = rows_f32(row_max, op, "row_max", N);
  g.log_sum = rows_f32(log_sum, op, "log_sum", N);
  g.grad_entropy = rows_f32(grad_entropy, op, "grad_entropy", N);
  if (g.grad_entropy.defined()) {
    g.entropy = rows_f32(entropy, op, "entropy", N);
    TORCH_CHECK(g.entropy.defined(), op, ": entropy is required when grad_entropy is given");
  }
  const bool has_bias = hd.bias32.defined();
  need_bias_grad = need_bias_grad && has_bias;
  const auto dense = at::MemoryFormat::Contiguous;
  at::Tensor d_h = need_hidden_grad ? at::zeros_like(hidden, dense) : hidden.new_empty({0});
  at::Tensor d_w = need_weight_grad ? at::zeros_like(weight, dense) : weight.new_empty({0});
  at::Tensor d_b = need_bias_grad ? at::zeros_like(*bias, dense) : weight.new_empty({0});
  if (!(need_hidden_grad || need_weight_grad || need_bias_grad) || N == 0) return {d_h, d_w, d_b};
  const auto sel = labelled_rows(hd);
  at::Tensor d_h_rows = d_h;
  if (sel.has_value()) {
    if (sel->size(0) == 0) return {d_h, d_w, d_b};
    hd.hidden = hd.hidden.index_select(0, *sel);
    hd.labels = hd.labels.index_select(0, *sel);
    hd.N = sel->size(0);
    for (at::Tensor* t : {&g.grad_logp, &g.grad_entropy, &g.row_max, &g.log_sum, &g.entropy}) {
      if (t->defined()) *t = t->index_select(0, *sel);
    }
    if (need_hidden_grad) d_h_rows = at::empty({hd.N, hd.H}, d_h.options());
  }
  const SweepOut d{need_hidden_grad ? d_h_rows : at::Tensor(),
                   need_weight_grad ? d_w : at::Tensor(), need_bias_grad ? d_b : at::Tensor()};
  backward_rows(hd, g, d);
  if (sel.has_value() && need_hidden_grad) d_h.index_copy_(0, *sel, d_h_rows);
  return {d_h, d_w, d_b};
}

FrozenResult linear_frozen_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, double temperature, double logit_scale,
    double softcap, bool batch_invariant, bool with_entropy) {
  const char* op = "native_linear_frozen_fwd";
  Head hd = make_head(hidden, weight, bias, labels, ignore_index, temperature, logit_scale,
                      softcap, 0, weight.size(0), batch_invariant, op);
  // contiguous rows for the label rows' pointers; a bf16/fp16 weight is converted chunk by
  // chunk in each thread's buffer (an fp32 copy of the whole head would be 2x its size)
  hd.weight = hd.weight.contiguous();
  const int64_t N = hd.N;
  const auto sel = labelled_rows(hd);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  if (!sel.has_value()) {
    at::Tensor u = at::empty({N, hd.H}, f32), ent = at::empty({with_entropy ? N : 0}, f32);
    auto out = frozen_rows(hd, u, with_entropy, ent);
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out), u, ent};
  }
  hd.hidden = hd.hidden.index_select(0, *sel);
  hd.labels = hd.labels.index_select(0, *sel);
  hd.N = sel->size(0);
  at::Tensor u_rows = at::empty({hd.N, hd.H}, f32);
  at::Tensor ent_rows = at::empty({with_entropy ? hd.N : 0}, f32);
  auto out = frozen_rows(hd, u_rows, with_entropy, ent_rows);
  auto scatter = [&](const at::Tensor& t) {
    return at::zeros({N}, t.options()).index_copy_(0, *sel, t);
  };
  at::Tensor u = at::zeros({N, hd.H}, u_rows.options()).index_copy_(0, *sel, u_rows);
  return {scatter(std::get<0>(out)), scatter(std::get<1>(out)), scatter(std::get<2>(out)), u,
          with_entropy ? scatter(ent_rows) : ent_rows};
}

int64_t linear_keep_numel(int64_t N, int64_t V, int64_t H, bool batch_invariant) {
  return keep_numel(cpu::tile_shape(V, H, machine_caches()), N, V, batch_invariant);
}

namespace {

// The head of a kept-chunk call, with the caller's buffer checked and attached. An empty keep
// passed to the backward (recompute) attaches none: it recomputes each tile's logits in cache.
Head kept_head(const at::Tensor& hidden, const at::Tensor& weight,
               const std::optional<at::Tensor>& bias, const at::Tensor& labels,
               int64_t ignore_index, double temperature, double logit_scale, double softcap,
               bool batch_invariant, const at::Tensor& keep, const char* op,
               bool recompute = false) {
  Head hd = make_head(hidden, weight, bias, labels, ignore_index, temperature, logit_scale,
                      softcap, 0, weight.size(0), batch_invariant, op);
  if (recompute && keep.numel() == 0) return hd;
  TORCH_CHECK(keep.scalar_type() == at::kFloat && keep.dim() == 1 && keep.is_contiguous() &&
                  keep.device().is_cpu(),
              op, ": keep must be a contiguous 1-D fp32 CPU tensor, got ", keep.scalar_type(),
              " of shape ", keep.sizes());
  const int64_t need = keep_numel(hd.tile, hd.N, hd.V, hd.invariant);
  TORCH_CHECK_VALUE(keep.numel() >= need, op, ": keep holds ", keep.numel(),
                    " floats; the tiles of this call need ", need, " (linear_keep_numel)");
  hd.keep = keep;
  return hd;
}

// An fp32 accumulator the caller passes (empty: not wanted).
bool accumulator(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  if (t.numel() == 0) return false;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape, op, ": ",
              name, " must be a contiguous fp32 tensor of shape ", shape, " (or empty), got ",
              t.scalar_type(), " of shape ", t.sizes());
  return true;
}

}  // namespace

FwdResult linear_keep_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, double temperature, double logit_scale,
    double softcap, bool batch_invariant, at::Tensor& keep, bool with_entropy) {
  const Head hd = kept_head(hidden, weight, bias, labels, ignore_index, temperature, logit_scale,
                            softcap, batch_invariant, keep, "native_linear_keep_fwd");
  auto out = forward_rows(hd, with_entropy);
  if (hd.N > 0) keep_marker(hd) = static_cast<float>(tile_rows_of(hd));
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out)};
}

at::Tensor linear_keep_bwd_cpu(at::Tensor& keep, const at::Tensor& grad_logp,
                               const at::Tensor& hidden, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                               const at::Tensor& row_max, const at::Tensor& log_sum,
                               int64_t ignore_index, double temperature, double logit_scale,
                               double softcap, bool batch_invariant, bool need_hidden_grad,
                               at::Tensor& d_weight, at::Tensor& d_bias) {
  const char* op = "native_linear_keep_bwd";
  const Head hd = kept_head(hidden, weight, bias, labels, ignore_index, temperature, logit_scale,
                            softcap, batch_invariant, keep, op, /*recompute=*/true);
  const int64_t N = hd.N;
  TORCH_CHECK(!hd.keep.defined() || N == 0 ||
                  keep_marker(hd) == static_cast<float>(tile_rows_of(hd)),
              op, ": keep holds tiles of ", keep_marker(hd), " rows, this call's are ",
              tile_rows_of(hd), " (not the rows of its linear_keep_fwd call)");
  RowGrads g;
  g.grad_logp = rows_f32(grad_logp, op, "grad_logp", N);
  g.row_max = rows_f32(row_max, op, "row_max", N);
  g.log_sum = rows_f32(log_sum, op, "log_sum", N);
  TORCH_CHECK(N == 0 || (g.grad_logp.defined() && g.row_max.defined() && g.log_sum.defined()),
              op, ": grad_logp, row_max and log_sum are required");
  const bool want_w = accumulator(d_weight, weight.sizes(), op, "d_weight");
  const bool want_b = accumulator(d_bias, {hd.V}, op, "d_bias");
  TORCH_CHECK(!want_b || hd.bias32.defined(), op, ": d_bias given without a bias");
  at::Tensor d_h = need_hidden_grad ? at::zeros_like(hidden, at::MemoryFormat::Contiguous)
                                    : hidden.new_empty({0});
  if (N == 0 || !(need_hidden_grad || want_w || want_b)) return d_h;
  const SweepOut d{need_hidden_grad ? d_h : at::Tensor(), want_w ? d_weight : at::Tensor(),
                   want_b ? d_bias : at::Tensor()};
  backward_rows(hd, g, d);  // fp32 accumulators: d_weight / d_bias add to what they hold
  return d_h;
}

std::tuple<int64_t, int64_t, int64_t, int64_t> linear_cpu_plan(int64_t V, int64_t H) {
  const cpu::CacheSizes& c = machine_caches();
  const cpu::TileShape t = cpu::tile_shape(V, H, c);
  return {t.rows, t.cols, c.l2, c.l3};
}

std::tuple<int64_t, int64_t, int64_t> linear_cpu_bwd_plan(int64_t N, int64_t V, int64_t H,
                                                          int64_t itemsize, bool batch_invariant,
                                                          bool softcap) {
  const cpu::TileShape t = cpu::tile_shape(V, H, machine_caches());
  const bool half = itemsize != 4;  // bf16/fp16 hidden, weight and d_weight (one dtype)
  const int64_t scratch =
      cpu::scratch_bytes(t, H, bwd_needs(softcap, batch_invariant, half, half, true, half));
  const BwdPlan p = bwd_plan(N, V, H, itemsize, (V + t.cols - 1) / t.cols, t.rows,
                             batch_invariant, true, scratch);
  return {p.groups, p.block_rows, scratch};
}

}  // namespace fastdpo
