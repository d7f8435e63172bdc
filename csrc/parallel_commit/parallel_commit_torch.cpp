// parallel_commit: argument checks, output allocation and the CPU/CUDA registrations.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "parallel_commit/parallel_commit.h"
#include "torch_checks.h"

#ifdef R2LM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace r2lm {
namespace {

constexpr const char* kOp = "parallel_commit";
constexpr int64_t kMaxBlock = 1024;  // the CUDA selection ranks a whole block in one CTA
constexpr double kMinTemperature = 1e-6;

CommitScore parse_score(const std::string& score) {
  if (score == "prob") return CommitScore::kProb;
  if (score == "margin") return CommitScore::kMargin;
  if (score == "neg_entropy") return CommitScore::kNegEntropy;
  TORCH_CHECK(false, kOp, ": score must be 'prob', 'margin' or 'neg_entropy', got '", score, "'");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> parallel_commit(
    const at::Tensor& logits, at::Tensor& tokens, int64_t mask_token_id, double threshold, int64_t min_per_step,
    int64_t max_per_step, double temperature, int64_t seed, int64_t step, const std::optional<at::Tensor>& step_tensor,
    const std::optional<at::Tensor>& active, c10::string_view score) {
  TORCH_CHECK(logits.is_cpu() || logits.is_cuda(), kOp, ": logits must be a CPU or CUDA tensor, got ",
              logits.device());
  check_dtype(logits, kOp, "logits", {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  TORCH_CHECK(logits.dim() == 3, kOp, ": logits must have shape (batch, block, vocab), got ", shape_str(logits));
  check_last_dim_contiguous(logits, kOp, "logits");
  const int64_t batch = logits.size(0), block = logits.size(1), vocab = logits.size(2);
  TORCH_CHECK(vocab >= 1 && vocab <= std::numeric_limits<int32_t>::max(), kOp,
              ": logits must have a vocab size in [1, 2^31), got ", vocab);
  TORCH_CHECK(block <= kMaxBlock, kOp, ": logits has block size ", block, "; at most ", kMaxBlock, " is supported");

  check_same_device(tokens, logits, kOp, "tokens");
  check_dtype(tokens, kOp, "tokens", {at::kLong});
  check_shape(tokens, kOp, "tokens", {batch, block});
  check_no_internal_overlap(tokens, kOp, "tokens");
  TORCH_CHECK(mask_token_id >= 0 && mask_token_id < vocab, kOp, ": mask_token_id must be in [0, vocab) = [0, ",
              vocab, "), got ", mask_token_id);
  TORCH_CHECK(min_per_step >= 0, kOp, ": min_per_step must be >= 0, got ", min_per_step);
  TORCH_CHECK(max_per_step >= 0, kOp, ": max_per_step must be >= 0 (0: no limit), got ", max_per_step);
  TORCH_CHECK(!std::isnan(threshold), kOp, ": threshold must not be NaN");
  // The kernels divide the logits by the temperature in fp32, which overflows for |x| > 3.4e38 * T (every
  // pick -inf: nothing committed; or ties at +inf: the lowest id wins). The floor keeps that far from any
  // logit (3.4e32 at 1e-6); the smaller temperatures it turns away sample as greedy decoding anyway.
  TORCH_CHECK(temperature == 0.0 || (std::isfinite(temperature) && temperature >= kMinTemperature),
              kOp, ": temperature must be 0 (greedy) or a finite number >= ", kMinTemperature, ", got ", temperature);
  if (step_tensor) {
    check_same_device(*step_tensor, logits, kOp, "step_tensor");
    check_dtype(*step_tensor, kOp, "step_tensor", {at::kLong});
    TORCH_CHECK(step_tensor->numel() == 1, kOp, ": step_tensor must hold one element, got shape ",
                shape_str(*step_tensor));
  }
  if (active) {
    check_same_device(*active, logits, kOp, "active");
    check_dtype(*active, kOp, "active", {at::kBool});
    check_shape(*active, kOp, "active", {batch});
  }
  const std::string score_name(score.data(), score.size());

  CommitParams p{};
  p.batch = batch;
  p.block = block;
  p.vocab = vocab;
  p.dtype = to_dtype(logits.scalar_type());
  p.logits = logits.data_ptr();
  p.logits_batch_stride = logits.stride(0);
  p.logits_pos_stride = logits.stride(1);
  p.tokens = tokens.data_ptr<int64_t>();
  p.tokens_batch_stride = tokens.stride(0);
  p.tokens_pos_stride = tokens.stride(1);
  p.active = active ? active->data_ptr<bool>() : nullptr;
  p.active_stride = active ? active->stride(0) : 0;
  p.step_tensor = step_tensor ? step_tensor->data_ptr<int64_t>() : nullptr;
  p.seed = static_cast<uint64_t>(seed);
  p.step = static_cast<uint64_t>(step);
  p.mask_token_id = mask_token_id;
  // Confidences are fp32: the threshold goes up to the first float not below it, so that the kernels' float
  // comparison confidence >= p.threshold is exactly confidence >= threshold.
  p.threshold = static_cast<float>(threshold);
  if (static_cast<double>(p.threshold) < threshold)
    p.threshold = std::nextafter(p.threshold, std::numeric_limits<float>::infinity());
  p.min_per_step = min_per_step;
  p.max_per_step = max_per_step;
  p.temperature = temperature;
  p.score = parse_score(score_name);

  auto committed = at::empty({batch, block}, logits.options().dtype(at::kBool));
  auto confidence = at::empty({batch, block}, logits.options().dtype(at::kFloat));
  auto n_masked = at::empty({batch}, logits.options().dtype(at::kInt));
  p.committed = committed.data_ptr<bool>();
  p.confidence = confidence.data_ptr<float>();
  p.n_masked = n_masked.data_ptr<int32_t>();
  if (batch == 0 || block == 0) {
    n_masked.zero_();
    return {committed, confidence, n_masked};
  }

#ifdef R2LM_WITH_CUDA
  if (logits.is_cuda()) {
    c10::cuda::CUDAGuard guard(logits.device());
    p.splits = parallel_commit_cuda_splits(p, logits.get_device());
    auto workspace = at::empty({parallel_commit_cuda_workspace_bytes(p)}, logits.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    const char* error = parallel_commit_cuda(p, c10::cuda::getCurrentCUDAStream(logits.get_device()).stream());
    TORCH_CHECK(error == nullptr, kOp, ": CUDA kernel launch failed: ", error);
    return {committed, confidence, n_masked};
  }
#endif
  use_torch_thread_count();
  parallel_commit_cpu(p);
  return {committed, confidence, n_masked};
}

}  // namespace

TORCH_LIBRARY_IMPL(r2lm, CPU, m) { m.impl("parallel_commit", &parallel_commit); }

#ifdef R2LM_WITH_CUDA
TORCH_LIBRARY_IMPL(r2lm, CUDA, m) { m.impl("parallel_commit", &parallel_commit); }
#endif

}  // namespace r2lm
