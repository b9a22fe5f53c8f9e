// Module init of kdfast._C and the schemas of every compiled op. Schemas are declared
// here, kernels in csrc/cpu/<op>.cpp (CPU key) and csrc/cuda/<op>.cu (CUDA key); fake
// (meta) implementations and autograd are registered from Python (kdfast/ops/<op>.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/cuda_host.h"
#include "cpu/output_pool.h"
#include "cpu/tiles.h"

#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#ifndef KDFAST_TORCH_VERSION
#define KDFAST_TORCH_VERSION "unknown"
#endif
#ifndef KDFAST_CUDA_ARCHS
#define KDFAST_CUDA_ARCHS ""
#endif

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  m.def("rkd_distance_cpp(Tensor student, Tensor teacher) -> Tensor");
  m.def(
      "rkd_distance_cpp_backward(Tensor grad, Tensor student, Tensor teacher, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor)");
  m.def("rkd_angle_cpp(Tensor student, Tensor teacher) -> Tensor");
  m.def(
      "rkd_angle_cpp_backward(Tensor grad, Tensor student, Tensor teacher, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor)");
  // the share of the angle loss whose vertex lies in [start, stop) (gather=True)
  m.def("rkd_angle_vertices_cpp(Tensor student, Tensor teacher, int start, int stop) -> Tensor");
  m.def(
      "rkd_angle_vertices_cpp_backward(Tensor grad, Tensor student, Tensor teacher, int start, "
      "int stop, bool student_grad, bool teacher_grad) -> (Tensor, Tensor)");
  // RKDLoss with both terms (csrc/rkd_loss_op.h): each side's Gram matrix formed once and,
  // with save_gram, returned for the backward to reuse (empty (0,) tensors otherwise)
  m.def(
      "rkd_loss_cpp(Tensor student, Tensor teacher, float distance_weight, float angle_weight, "
      "bool save_gram) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rkd_loss_cpp_backward(Tensor grad, Tensor student, Tensor teacher, Tensor gram_s, "
      "Tensor gram_t, float distance_weight, float angle_weight, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor)");
  // Fused logit losses: the gradient is computed in the forward pass when the flags ask for
  // it (set from torch.is_grad_enabled() and requires_grad); empty tensors otherwise.
  m.def(
      "kd_loss_cpp(Tensor student, Tensor teacher, float temperature, float loss_scale, "
      "str reduction, Tensor? mask, str teacher_kind, bool compute_grad_student, "
      "bool compute_grad_teacher) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dist_loss_cpp(Tensor student, Tensor teacher, float beta, float gamma, float temperature, "
      "bool temperature_squared, str activation, Tensor? mask, bool compute_grad_student, "
      "bool compute_grad_teacher) -> (Tensor, Tensor, Tensor)");
  // matrix exponential (semantics 6): ATen path (any n) and the fused small-matrix kernel (n <= 32)
  m.def("expm_cpp(Tensor A, bool skew) -> Tensor");
  m.def("expm_frechet_cpp(Tensor A, Tensor E, bool skew=False) -> (Tensor, Tensor)");
  // forward that keeps its powers and LU (thresholds l_m), and the backward that reuses them
  m.def(
      "expm_save_cpp(Tensor A, bool skew) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "expm_backward_cpp(Tensor grad, Tensor powers, Tensor LUt, Tensor pivots, Tensor R0t, "
      "Tensor m, Tensor s) -> Tensor");
  m.def("expm_small_cpp(Tensor A, bool skew) -> Tensor");
  m.def("expm_frechet_small_cpp(Tensor A, Tensor E, bool skew=False) -> (Tensor, Tensor)");
  // Test-only: the raw CUDA kernels run on the CPU grid driver (csrc/cpu/cuda_host_*.cpp),
  // `threads` per block and `max_blocks` overriding the CUDA launchers' (0: theirs). CPU
  // tensors, always built; no backend of kdfast/_dispatch.py uses them.
  m.def("rkd_distance_cuda_host(Tensor student, Tensor teacher, int threads=0) -> Tensor");
  m.def(
      "rkd_distance_cuda_host_backward(Tensor grad, Tensor student, Tensor teacher, "
      "bool student_grad, bool teacher_grad, int threads=0) -> (Tensor, Tensor)");
  m.def("rkd_angle_cuda_host(Tensor student, Tensor teacher, int threads=0) -> Tensor");
  m.def(
      "rkd_angle_cuda_host_backward(Tensor grad, Tensor student, Tensor teacher, "
      "bool student_grad, bool teacher_grad, int threads=0) -> (Tensor, Tensor)");
  m.def(
      "rkd_angle_vertices_cuda_host(Tensor student, Tensor teacher, int start, int stop, "
      "int threads=0) -> Tensor");
  m.def(
      "rkd_angle_vertices_cuda_host_backward(Tensor grad, Tensor student, Tensor teacher, "
      "int start, int stop, bool student_grad, bool teacher_grad, int threads=0) -> "
      "(Tensor, Tensor)");
  m.def(
      "expm_small_cuda_host(Tensor A, bool skew, int threads=0, int max_blocks=0) -> Tensor");
  m.def(
      "expm_frechet_small_cuda_host(Tensor A, Tensor E, bool skew=False, int threads=0, "
      "int max_blocks=0) -> (Tensor, Tensor)");
#ifdef WITH_CUDA
  m.def("rkd_distance_cuda(Tensor student, Tensor teacher) -> Tensor");
  m.def(
      "rkd_distance_cuda_backward(Tensor grad, Tensor student, Tensor teacher, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor)");
  m.def("rkd_angle_cuda(Tensor student, Tensor teacher) -> Tensor");
  m.def(
      "rkd_angle_cuda_backward(Tensor grad, Tensor student, Tensor teacher, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor)");
  // the share of the angle loss whose vertex lies in [start, stop) (gather=True)
  m.def("rkd_angle_vertices_cuda(Tensor student, Tensor teacher, int start, int stop) -> Tensor");
  m.def(
      "rkd_angle_vertices_cuda_backward(Tensor grad, Tensor student, Tensor teacher, int start, "
      "int stop, bool student_grad, bool teacher_grad) -> (Tensor, Tensor)");
#endif
}

namespace {

bool built_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::vector<std::string> cuda_archs() {
  std::vector<std::string> archs;
  std::stringstream stream(KDFAST_CUDA_ARCHS);
  std::string arch;
  while (std::getline(stream, arch, ';')) {
    if (!arch.empty()) archs.push_back(arch);
  }
  return archs;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdfast compiled kernels; ops are registered under torch.ops.kdfast";
  m.attr("torch_version") = KDFAST_TORCH_VERSION;
  m.def("built_with_cuda", &built_with_cuda, "whether CUDA sources were compiled");
  m.def("cuda_archs", &cuda_archs, "CUDA architectures compiled for (TORCH_CUDA_ARCH_LIST)");
  m.def("mkl_thread_local", &kdfast::tiles::mkl_local_threads_available,
        "whether the CPU passes can set MKL's thread-local thread count (csrc/cpu/tiles.h)");
  m.def("release_cached_outputs", [] { return kdfast::pool::OutputPool::instance().release(); },
        "free the idle recycled gradient buffers of the CPU logit kernels; returns bytes");
  m.def(
      "cuda_host_launches",
      [] {
        std::vector<std::tuple<std::string, int64_t, int64_t>> out;
        for (const auto& l : kdfast::cuda_host::take_launches()) {
          out.emplace_back(l.kernel, l.blocks, l.threads);
        }
        return out;
      },
      "(kernel, blocks, threads per block) of the CPU grid driver's launches since the last "
      "call (test-only, csrc/cpu/cuda_host.h)");
  m.def("cached_output_bytes", [] { return kdfast::pool::OutputPool::instance().idle_bytes(); },
        "bytes held by idle recycled gradient buffers");
}
