// DaliFloatWindowRead: a stateless DALI CPU operator that turns a clip's record address and two random
// integers into a training sample: the window's rows, read with one pread from the clip's shard, the
// reference frame's leading bytes (its motion latent), and the window start / reference frame / row.
//
// Why an operator of our own:
//  * fn.readers.numpy reads a region of interest through a fresh mmap of the file for every sample,
//    so each 4 KiB page of a 1.17 MB window costs a page fault (~4 GB/s per thread on the CPU); a
//    pread from the page cache is one kernel copy (~15-20 GB/s per thread);
//  * the per-sample arithmetic (valid starts, reference rule) as DALI arithmetic operators costs
//    ~30 us per operator per batch, more than reading a small window;
//  * the clips live in a few large shard files (cache_format.py): a reader of one file per sample
//    does not apply.
// The epoch (which clips, in which order, on which rank) is the pipeline's external source over the
// training view's arrays; the draws come from fn.random.uniform. This operator keeps no state between
// iterations (only open file descriptors), so DALI checkpoints stay exact.
//
// The sampling rules mirror dali_float/loaders/sampling.py (the reference definition):
//   window_start = draw0 % (num_frames - rows + 1)
//   ref_frame    = 0 | draw1 % num_frames | window_start + draw1 % rows   (ref_rule first|clip|window)
// With ref_rule "given", input 1 holds (window_start, ref_frame) themselves (fixed lists).
//
// Inputs:  0: (4,) int64 record address: shard number, byte offset of the clip's frames rows,
//             num_frames, row (the clip's index in the training view); 1: (2,) int64 draws.
// Outputs: 0: (rows, row_bytes) uint8 window, 1: (ref_bytes,) uint8 reference row prefix,
//          2: (window_start, ref_frame, row) int64. The caller views the bytes as the cache's dtype.
// Arguments: files (shard paths by shard number), rows, row_bytes, ref_bytes, ref_rule.
// Errors name the row and the shard; the Python side turns the row into the clip id.

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

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
  int64_t shard, offset, row, start, ref;
};

class WindowRead : public ::dali::StatelessOperator<::dali::CPUBackend> {
 public:
  explicit WindowRead(const ::dali::OpSpec &spec)
      : ::dali::StatelessOperator<::dali::CPUBackend>(spec),
        files_(spec.GetRepeatedArgument<std::string>("files")),
        rows_(spec.GetArgument<int>("rows")),
        row_bytes_(spec.GetArgument<int>("row_bytes")),
        ref_bytes_(spec.GetArgument<int>("ref_bytes")),
        ref_rule_(ParseRefRule(spec.GetArgument<std::string>("ref_rule"))),
        fds_(files_.size(), -1) {
    DALI_ENFORCE(rows_ > 0 && row_bytes_ > 0 && ref_bytes_ > 0 && ref_bytes_ <= row_bytes_,
                 "rows, row_bytes and ref_bytes must be positive, ref_bytes at most row_bytes");
  }

  ~WindowRead() override {
    for (int fd : fds_)
      if (fd >= 0) close(fd);
  }

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    const auto &records = ws.Input<::dali::CPUBackend>(0);
    const auto &draws = ws.Input<::dali::CPUBackend>(1);
    DALI_ENFORCE(records.type() == DALI_INT64 && draws.type() == DALI_INT64, "records and draws must be int64");
    int n = records.num_samples();
    samples_.resize(n);
    for (int i = 0; i < n; i++) {
      DALI_ENFORCE(records.tensor_shape(i).num_elements() == 4 && draws.tensor_shape(i).num_elements() == 2,
                   "malformed record address or draws");
      const int64_t *r = records.tensor<int64_t>(i);
      const int64_t *d = draws.tensor<int64_t>(i);
      Sample &s = samples_[i];
      s.shard = r[0];
      s.offset = r[1];
      int64_t num_frames = r[2];
      s.row = r[3];
      DALI_ENFORCE(s.shard >= 0 && s.shard < static_cast<int64_t>(files_.size()),
                   ::dali::make_string("row ", s.row, ": no shard number ", s.shard));
      DALI_ENFORCE(num_frames >= rows_, ::dali::make_string("row ", s.row, ": ", num_frames,
                                                            " frames, fewer than a window (", rows_, ")"));
      if (ref_rule_ == RefRule::kGiven) {
        s.start = d[0];
        s.ref = d[1];
      } else {
        DALI_ENFORCE(d[0] >= 0 && d[1] >= 0, "random draws must be non-negative");
        s.start = d[0] % (num_frames - rows_ + 1);
        s.ref = ref_rule_ == RefRule::kFirst        ? 0
                : ref_rule_ == RefRule::kRandomInClip ? d[1] % num_frames
                                                      : s.start + d[1] % rows_;
      }
      DALI_ENFORCE(s.start >= 0 && s.start + rows_ <= num_frames && s.ref >= 0 && s.ref < num_frames,
                   ::dali::make_string("row ", s.row, ": window [", s.start, ", ", s.start + rows_,
                                       ") or reference ", s.ref, " is outside the clip (", num_frames, " frames)"));
    }
    output_desc.resize(3);
    output_desc[0].type = output_desc[1].type = DALI_UINT8;
    output_desc[0].shape = ::dali::uniform_list_shape(n, ::dali::TensorShape<2>{rows_, row_bytes_});
    output_desc[1].shape = ::dali::uniform_list_shape(n, ::dali::TensorShape<1>{ref_bytes_});
    output_desc[2].type = DALI_INT64;
    output_desc[2].shape = ::dali::uniform_list_shape(n, ::dali::TensorShape<1>{3});
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
      posix_fadvise(fd, s.offset + s.start * row_bytes_, static_cast<int64_t>(rows_) * row_bytes_, POSIX_FADV_WILLNEED);
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
      int64_t window_bytes = static_cast<int64_t>(rows_) * row_bytes_, ref_bytes = ref_bytes_, row = s.row;
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
  int rows_, row_bytes_, ref_bytes_;
  RefRule ref_rule_;
  std::vector<int> fds_;  // one per shard, opened on first use, kept (a compaction may unlink the file)
  std::mutex mutex_;
  std::vector<Sample> samples_;
};

}  // namespace dali_float

DALI_REGISTER_OPERATOR(DaliFloatWindowRead, ::dali_float::WindowRead, ::dali::CPU);

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
