// The DALI operators of the DALI loader: a clip's record address and two random integers become a
// training sample (the window's rows, the reference frame's leading bytes, and the window start /
// reference frame / row). One sampling rule, two places the rows come from:
//
//   DaliFloatWindowRead    (cpu)        the `pread` strategy: one pread per window from the clip's shard.
//   DaliFloatWindowIndex   (cpu)        the `resident` strategy, first half: (window start, reference
//                                       frame, row) by the rule, nothing read.
//   DaliFloatWindowGather  (cpu, mixed) the `resident` strategy, second half: the window's rows and the
//                                       reference row copied out of this rank's partition, one buffer
//                                       held in host memory (cpu) or device memory (mixed: a batched
//                                       device-to-device copy on the pipeline's stream, DALI's
//                                       ScatterGatherGPU; the indices stay on the host).
//
// Why operators of our own:
//  * fn.readers.numpy reads a region of interest through a fresh mmap of the file for every sample,
//    so each 4 KiB page of a 1.17 MB window costs a page fault (~4 GB/s per thread on the CPU); a
//    pread from the page cache is one kernel copy (~15-20 GB/s per thread);
//  * the per-sample arithmetic (valid starts, reference rule) as DALI arithmetic operators costs
//    ~30 us per operator per batch, more than reading a small window;
//  * the clips live in a few large shard files (cache/format.py), or in one resident buffer: a reader
//    of one file per sample, or an external source handing DALI a clip per sample, does not apply.
// The epoch (which clips, in which order, on which rank) is the pipeline's external source over the
// training view's arrays; the draws come from fn.random.uniform. These operators keep no state between
// iterations (only open file descriptors), so DALI checkpoints stay exact.
//
// The sampling rules mirror dali_float/loaders/sampling.py (the reference definition):
//   window_start = draw0 % (num_frames - rows + 1)
//   ref_frame    = 0 | draw1 % num_frames | window_start + draw1 % rows   (ref_rule first|clip|window)
// With ref_rule "given", input 1 holds (window_start, ref_frame) themselves (fixed lists).
//
// Record address, input 0 of every operator: (4,) int64: shard number, byte offset of the clip's frames
// rows (in its shard; for the gather, in the resident buffer, whose shard number is 0), num_frames, row
// (the clip's index in the training view).
// WindowRead:   input 1: (2,) int64 draws. Outputs: 0: (rows, row_bytes) uint8 window, 1: (ref_bytes,)
//               uint8 reference row prefix, 2: (window_start, ref_frame, row) int64.
// WindowIndex:  input 1: (2,) int64 draws. Output: (window_start, ref_frame, row) int64.
// WindowGather: input 1: (3,) int64 WindowIndex's output. Outputs: the window and reference bytes.
// The caller views the bytes as the cache's dtype. Errors name the row (and the shard); the Python side
// turns the row into the clip id.
//
// The resident buffer reaches the gather as its address and size (arguments buffer_address,
// buffer_bytes): DALI has no input that persists across iterations, and an external source would hand
// the whole buffer over again at every one. The loader that builds the pipeline owns the buffer and
// keeps it alive, unmodified, for as long as the pipeline exists.

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "dali/kernels/common/scatter_gather.h"
#include "dali/pipeline/operator/checkpointing/stateless_operator.h"
#include "dali/pipeline/operator/operator.h"

namespace dali_float {

enum class RefRule { kFirst, kRandomInClip, kRandomInWindow, kGiven };

static RefRule ParseRefRule(const std::string &rule) {
  if (rule == "first") return RefRule::kFirst;
  if (rule == "random_in_clip") return RefRule::kRandomInClip;
  if (rule == "random_in_window") return RefRule::kRandomInWindow;
  if (rule == "given") return RefRule::kGiven;
  DALI_FAIL(::dali::make_string("unknown ref_rule ", rule));
}

struct Sample {
  int64_t shard, offset, num_frames, row, start, ref;
};

// Sample i of a batch: its record address and, by the rule, its window start and reference frame.
static Sample SampleAt(const ::dali::TensorList<::dali::CPUBackend> &records,
                       const ::dali::TensorList<::dali::CPUBackend> &draws, int i, int rows, RefRule rule) {
  DALI_ENFORCE(records.tensor_shape(i).num_elements() == 4 && draws.tensor_shape(i).num_elements() == 2,
               "malformed record address or draws");
  const int64_t *r = records.tensor<int64_t>(i);
  const int64_t *d = draws.tensor<int64_t>(i);
  Sample s{r[0], r[1], r[2], r[3], 0, 0};
  DALI_ENFORCE(s.num_frames >= rows, ::dali::make_string("row ", s.row, ": ", s.num_frames,
                                                         " frames, fewer than a window (", rows, ")"));
  if (rule == RefRule::kGiven) {
    s.start = d[0];
    s.ref = d[1];
  } else {
    DALI_ENFORCE(d[0] >= 0 && d[1] >= 0, "random draws must be non-negative");
    s.start = d[0] % (s.num_frames - rows + 1);
    s.ref = rule == RefRule::kFirst          ? 0
            : rule == RefRule::kRandomInClip ? d[1] % s.num_frames
                                             : s.start + d[1] % rows;
  }
  DALI_ENFORCE(s.start >= 0 && s.start + rows <= s.num_frames && s.ref >= 0 && s.ref < s.num_frames,
               ::dali::make_string("row ", s.row, ": window [", s.start, ", ", s.start + rows,
                                   ") or reference ", s.ref, " is outside the clip (", s.num_frames, " frames)"));
  return s;
}

static void CheckInt64(const ::dali::Workspace &ws) {
  DALI_ENFORCE(ws.Input<::dali::CPUBackend>(0).type() == DALI_INT64 &&
                   ws.Input<::dali::CPUBackend>(1).type() == DALI_INT64,
               "the inputs must be int64");
}

static void DescribeWindowOutputs(std::vector<::dali::OutputDesc> &output_desc, int first, int n, int rows,
                                  int row_bytes, int ref_bytes) {
  output_desc[first].type = output_desc[first + 1].type = DALI_UINT8;
  output_desc[first].shape = ::dali::uniform_list_shape(n, ::dali::TensorShape<2>{rows, row_bytes});
  output_desc[first + 1].shape = ::dali::uniform_list_shape(n, ::dali::TensorShape<1>{ref_bytes});
}

static void DescribeIndexOutput(::dali::OutputDesc &desc, int n) {
  desc.type = DALI_INT64;
  desc.shape = ::dali::uniform_list_shape(n, ::dali::TensorShape<1>{3});
}

// What every operator here reads from its arguments, and the samples of the current batch.
template <typename Backend>
class WindowOp : public ::dali::StatelessOperator<Backend> {
 public:
  explicit WindowOp(const ::dali::OpSpec &spec)
      : ::dali::StatelessOperator<Backend>(spec),
        rows_(spec.GetArgument<int>("rows")),
        row_bytes_(spec.template GetArgument<int>("row_bytes")),
        ref_bytes_(spec.template GetArgument<int>("ref_bytes")) {
    DALI_ENFORCE(rows_ > 0 && row_bytes_ > 0 && ref_bytes_ > 0 && ref_bytes_ <= row_bytes_,
                 "rows, row_bytes and ref_bytes must be positive, ref_bytes at most row_bytes");
  }

 protected:
  int64_t WindowBytes() const { return static_cast<int64_t>(rows_) * row_bytes_; }

  int rows_, row_bytes_, ref_bytes_;
  std::vector<Sample> samples_;
};

class WindowRead : public WindowOp<::dali::CPUBackend> {
 public:
  explicit WindowRead(const ::dali::OpSpec &spec)
      : WindowOp<::dali::CPUBackend>(spec),
        files_(spec.GetRepeatedArgument<std::string>("files")),
        ref_rule_(ParseRefRule(spec.GetArgument<std::string>("ref_rule"))),
        fds_(files_.size(), -1) {}

  ~WindowRead() override {
    for (int fd : fds_)
      if (fd >= 0) close(fd);
  }

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    CheckInt64(ws);
    const auto &records = ws.Input<::dali::CPUBackend>(0);
    int n = records.num_samples();
    samples_.resize(n);
    for (int i = 0; i < n; i++) {
      samples_[i] = SampleAt(records, ws.Input<::dali::CPUBackend>(1), i, rows_, ref_rule_);
      const Sample &s = samples_[i];
      DALI_ENFORCE(s.shard >= 0 && s.shard < static_cast<int64_t>(files_.size()),
                   ::dali::make_string("row ", s.row, ": no shard number ", s.shard));
    }
    output_desc.resize(3);
    DescribeWindowOutputs(output_desc, 0, n, rows_, row_bytes_, ref_bytes_);
    DescribeIndexOutput(output_desc[2], n);
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override {
    auto &windows = ws.Output<::dali::CPUBackend>(0);
    auto &refs = ws.Output<::dali::CPUBackend>(1);
    auto &pool = ws.GetThreadPool();
    // Every window of the batch announced first: reads that miss the page cache (a cache larger than
    // memory) then go to the disk side by side, not one after the other (~1 us each when cached).
    for (const Sample &s : samples_) {
      int fd = Fd(s.shard, s.row);
      posix_fadvise(fd, s.offset + s.start * row_bytes_, WindowBytes(), POSIX_FADV_WILLNEED);
      posix_fadvise(fd, s.offset + s.ref * row_bytes_, ref_bytes_, POSIX_FADV_WILLNEED);
    }
    for (int i = 0; i < windows.num_samples(); i++) {
      const Sample &s = samples_[i];
      int64_t *ids = ws.Output<::dali::CPUBackend>(2).mutable_tensor<int64_t>(i);
      ids[0] = s.start;
      ids[1] = s.ref;
      ids[2] = s.row;
      int fd = Fd(s.shard, s.row);
      const std::string &path = files_[s.shard];
      char *window_dst = static_cast<char *>(windows.raw_mutable_tensor(i));
      char *ref_dst = static_cast<char *>(refs.raw_mutable_tensor(i));
      int64_t window_offset = s.offset + s.start * row_bytes_, ref_offset = s.offset + s.ref * row_bytes_;
      int64_t window_bytes = WindowBytes(), ref_bytes = ref_bytes_, row = s.row;
      pool.AddWork([=, &path](int) {
        ReadFully(fd, window_dst, window_bytes, window_offset, path, row);
        ReadFully(fd, ref_dst, ref_bytes, ref_offset, path, row);
      }, window_bytes);
    }
    pool.RunAll();
  }

 private:
  static void ReadFully(int fd, char *dst, int64_t bytes, int64_t offset, const std::string &path, int64_t row) {
    while (bytes > 0) {
      ssize_t got = pread(fd, dst, bytes, offset);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        DALI_FAIL(::dali::make_string("row ", row, ": short read from ", path, " at byte ", offset, ": ",
                                      got < 0 ? std::strerror(errno) : "the shard ends early"));
      }
      dst += got;
      offset += got;
      bytes -= got;
    }
  }

  int Fd(int64_t shard, int64_t row) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (fds_[shard] < 0) {
      fds_[shard] = open(files_[shard].c_str(), O_RDONLY | O_CLOEXEC);
      DALI_ENFORCE(fds_[shard] >= 0, ::dali::make_string("row ", row, ": cannot open ", files_[shard], ": ",
                                                         std::strerror(errno)));
    }
    return fds_[shard];
  }

  std::vector<std::string> files_;
  RefRule ref_rule_;
  std::vector<int> fds_;  // one per shard, opened on first use, kept (a compaction may unlink the file)
  std::mutex mutex_;
};

class WindowIndex : public ::dali::StatelessOperator<::dali::CPUBackend> {
 public:
  explicit WindowIndex(const ::dali::OpSpec &spec)
      : ::dali::StatelessOperator<::dali::CPUBackend>(spec),
        rows_(spec.GetArgument<int>("rows")),
        ref_rule_(ParseRefRule(spec.GetArgument<std::string>("ref_rule"))) {
    DALI_ENFORCE(rows_ > 0, "rows must be positive");
  }

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    CheckInt64(ws);
    const auto &records = ws.Input<::dali::CPUBackend>(0);
    int n = records.num_samples();
    samples_.resize(n);
    for (int i = 0; i < n; i++) samples_[i] = SampleAt(records, ws.Input<::dali::CPUBackend>(1), i, rows_, ref_rule_);
    output_desc.resize(1);
    DescribeIndexOutput(output_desc[0], n);
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override {
    auto &out = ws.Output<::dali::CPUBackend>(0);
    for (int i = 0; i < out.num_samples(); i++) {
      int64_t *ids = out.mutable_tensor<int64_t>(i);
      ids[0] = samples_[i].start;
      ids[1] = samples_[i].ref;
      ids[2] = samples_[i].row;
    }
  }

 private:
  int rows_;
  RefRule ref_rule_;
  std::vector<Sample> samples_;
};

// The gather's sources, checked against the buffer: (window, reference) byte offsets per sample.
template <typename Backend>
class WindowGatherBase : public WindowOp<Backend> {
 public:
  explicit WindowGatherBase(const ::dali::OpSpec &spec)
      : WindowOp<Backend>(spec),
        base_(reinterpret_cast<const char *>(spec.template GetArgument<int64_t>("buffer_address"))),
        buffer_bytes_(spec.template GetArgument<int64_t>("buffer_bytes")) {
    DALI_ENFORCE(base_ != nullptr && buffer_bytes_ > 0, "buffer_address and buffer_bytes must be set");
  }

 protected:
  using WindowOp<Backend>::rows_;
  using WindowOp<Backend>::row_bytes_;
  using WindowOp<Backend>::ref_bytes_;
  using WindowOp<Backend>::samples_;

  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    CheckInt64(ws);
    const auto &records = ws.Input<::dali::CPUBackend>(0);
    const auto &indices = ws.Input<::dali::CPUBackend>(1);
    int n = records.num_samples();
    samples_.resize(n);
    for (int i = 0; i < n; i++) {
      DALI_ENFORCE(records.tensor_shape(i).num_elements() == 4 && indices.tensor_shape(i).num_elements() == 3,
                   "malformed record address or indices");
      const int64_t *r = records.tensor<int64_t>(i);
      const int64_t *x = indices.tensor<int64_t>(i);
      Sample s{r[0], r[1], r[2], r[3], x[0], x[1]};
      DALI_ENFORCE(s.start >= 0 && s.start + rows_ <= s.num_frames && s.ref >= 0 && s.ref < s.num_frames,
                   ::dali::make_string("row ", s.row, ": window [", s.start, ", ", s.start + rows_,
                                       ") or reference ", s.ref, " is outside the clip (", s.num_frames,
                                       " frames)"));
      DALI_ENFORCE(s.shard == 0 && s.offset >= 0 && s.offset + s.num_frames * row_bytes_ <= buffer_bytes_,
                   ::dali::make_string("row ", s.row, ": its rows [", s.offset, ", ",
                                       s.offset + s.num_frames * row_bytes_, ") are not in the resident buffer (",
                                       buffer_bytes_, " bytes)"));
      samples_[i] = s;
    }
    output_desc.resize(2);
    DescribeWindowOutputs(output_desc, 0, n, rows_, row_bytes_, ref_bytes_);
    return true;
  }

  const char *WindowSource(const Sample &s) const { return base_ + s.offset + s.start * row_bytes_; }
  const char *RefSource(const Sample &s) const { return base_ + s.offset + s.ref * row_bytes_; }

  const char *base_;
  int64_t buffer_bytes_;
};

class WindowGatherCPU : public WindowGatherBase<::dali::CPUBackend> {
 public:
  using WindowGatherBase<::dali::CPUBackend>::WindowGatherBase;

 protected:
  void RunImpl(::dali::Workspace &ws) override {
    auto &windows = ws.Output<::dali::CPUBackend>(0);
    auto &refs = ws.Output<::dali::CPUBackend>(1);
    auto &pool = ws.GetThreadPool();
    int64_t window_bytes = WindowBytes(), ref_bytes = ref_bytes_;
    for (int i = 0; i < windows.num_samples(); i++) {
      char *window_dst = static_cast<char *>(windows.raw_mutable_tensor(i));
      char *ref_dst = static_cast<char *>(refs.raw_mutable_tensor(i));
      const char *window_src = WindowSource(samples_[i]), *ref_src = RefSource(samples_[i]);
      pool.AddWork([=](int) {
        std::memcpy(window_dst, window_src, window_bytes);
        std::memcpy(ref_dst, ref_src, ref_bytes);
      }, window_bytes);
    }
    pool.RunAll();
  }
};

class WindowGatherGPU : public WindowGatherBase<::dali::MixedBackend> {
 public:
  using WindowGatherBase<::dali::MixedBackend>::WindowGatherBase;

 protected:
  void RunImpl(::dali::Workspace &ws) override {
    auto &windows = ws.Output<::dali::GPUBackend>(0);
    auto &refs = ws.Output<::dali::GPUBackend>(1);
    for (int i = 0; i < windows.num_samples(); i++) {
      copies_.AddCopy(windows.raw_mutable_tensor(i), WindowSource(samples_[i]), WindowBytes());
      copies_.AddCopy(refs.raw_mutable_tensor(i), RefSource(samples_[i]), ref_bytes_);
    }
    // One kernel for the batch's copies (cudaMemcpyAsync where there are two or fewer), on the
    // pipeline's stream: asynchronous, nothing waits for it here.
    copies_.Run(ws.stream(), true, ::dali::kernels::ScatterGatherGPU::Method::Default, cudaMemcpyDeviceToDevice);
  }

 private:
  ::dali::kernels::ScatterGatherGPU copies_;
};

}  // namespace dali_float

DALI_REGISTER_OPERATOR(DaliFloatWindowRead, ::dali_float::WindowRead, ::dali::CPU);
DALI_REGISTER_OPERATOR(DaliFloatWindowIndex, ::dali_float::WindowIndex, ::dali::CPU);
DALI_REGISTER_OPERATOR(DaliFloatWindowGather, ::dali_float::WindowGatherCPU, ::dali::CPU);
DALI_REGISTER_OPERATOR(DaliFloatWindowGather, ::dali_float::WindowGatherGPU, ::dali::Mixed);

DALI_SCHEMA(DaliFloatWindowRead)
    .DocStr("A training window of a shard, read with pread, from a record address and two draws.")
    .NumInput(2)
    .NumOutput(3)
    .MakeStateless()
    .AddArg("files", "Shard paths by shard number.", DALI_STRING_VEC)
    .AddArg("rows", "Rows of the window.", DALI_INT32)
    .AddArg("row_bytes", "Bytes of one row (frame).", DALI_INT32)
    .AddArg("ref_bytes", "Leading bytes of the reference row to read (the motion latent).", DALI_INT32)
    .AddArg("ref_rule", "first, random_in_clip, random_in_window, or given (input 1 = start, ref).", DALI_STRING);

DALI_SCHEMA(DaliFloatWindowIndex)
    .DocStr("A training sample's (window start, reference frame, row) from a record address and two draws.")
    .NumInput(2)
    .NumOutput(1)
    .MakeStateless()
    .AddArg("rows", "Rows of the window.", DALI_INT32)
    .AddArg("ref_rule", "first, random_in_clip, random_in_window, or given (input 1 = start, ref).", DALI_STRING);

DALI_SCHEMA(DaliFloatWindowGather)
    .DocStr("A training window copied out of a resident buffer (host or device memory), from a record "
            "address and DaliFloatWindowIndex's (start, ref, row).")
    .NumInput(2)
    .InputDevice(0, ::dali::InputDevice::CPU)
    .InputDevice(1, ::dali::InputDevice::CPU)
    .NumOutput(2)
    .MakeStateless()
    .AddArg("buffer_address", "Address of the resident buffer (host memory for cpu, device memory for mixed).",
            DALI_INT64)
    .AddArg("buffer_bytes", "Size of the resident buffer in bytes.", DALI_INT64)
    .AddArg("rows", "Rows of the window.", DALI_INT32)
    .AddArg("row_bytes", "Bytes of one row (frame).", DALI_INT32)
    .AddArg("ref_bytes", "Leading bytes of the reference row to copy (the motion latent).", DALI_INT32);
