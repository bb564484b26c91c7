// DaliFloatWindowRead: a stateless DALI CPU operator that reads `rows` consecutive rows (the first
// `columns` values of each) of a 2-D .npy file with one pread per sample.
//
// Why: fn.readers.numpy reads a region of interest through a fresh mmap of the file for every sample,
// so each 4 KiB page of a 1.17 MB window costs a page fault (~4 GB/s per thread on the CPU). A pread
// from the page cache is one kernel copy (~15-20 GB/s per thread). The clip list, shuffling, sharding
// and checkpointing stay with fn.readers.numpy (over the tiny clip_info.npy files); this operator only
// turns (clip uid, first row) into the window's bytes. It keeps no state between iterations, so DALI
// checkpoints stay exact.
//
// Inputs:  0: clip uid (scalar integer per sample), 1: first row (scalar integer per sample).
// Output:  (rows, columns) of the files' dtype.
// Arguments: files (list of paths indexed by clip uid; "" where no clip has that uid), rows, columns
// (0: every column).

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "dali/pipeline/operator/checkpointing/stateless_operator.h"
#include "dali/pipeline/operator/operator.h"

namespace dali_float {

struct NpyHeader {
  int64_t data_offset = 0;
  int64_t num_rows = 0;
  int64_t num_columns = 0;
  ::dali::DALIDataType type = DALI_NO_TYPE;
  int64_t item_bytes = 0;
};

static ::dali::DALIDataType TypeFromDescr(const std::string &descr, int64_t *item_bytes) {
  static const std::unordered_map<std::string, std::pair<::dali::DALIDataType, int64_t>> kTypes = {
      {"<f2", {DALI_FLOAT16, 2}}, {"<f4", {DALI_FLOAT, 4}},
      {"<f8", {DALI_FLOAT64, 8}}, {"<i4", {DALI_INT32, 4}},
      {"<i8", {DALI_INT64, 8}},   {"|u1", {DALI_UINT8, 1}}};
  auto it = kTypes.find(descr);
  if (it == kTypes.end()) return DALI_NO_TYPE;
  *item_bytes = it->second.second;
  return it->second.first;
}

static NpyHeader ParseHeader(const std::string &path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  DALI_ENFORCE(fd >= 0, ::dali::make_string("cannot open ", path, ": ", std::strerror(errno)));
  char prefix[12];
  ssize_t got = pread(fd, prefix, sizeof(prefix), 0);
  DALI_ENFORCE(got == static_cast<ssize_t>(sizeof(prefix)) && std::memcmp(prefix, "\x93NUMPY", 6) == 0,
               ::dali::make_string(path, " is not a .npy file"));
  int major = static_cast<unsigned char>(prefix[6]);
  int64_t header_len, header_start;
  if (major == 1) {
    header_len = static_cast<unsigned char>(prefix[8]) | (static_cast<unsigned char>(prefix[9]) << 8);
    header_start = 10;
  } else {
    header_len = 0;
    for (int i = 0; i < 4; i++) header_len |= static_cast<int64_t>(static_cast<unsigned char>(prefix[8 + i])) << (8 * i);
    header_start = 12;
  }
  std::string header(header_len, '\0');
  got = pread(fd, &header[0], header_len, header_start);
  close(fd);
  DALI_ENFORCE(got == header_len, ::dali::make_string(path, ": truncated .npy header"));

  NpyHeader h;
  h.data_offset = header_start + header_len;
  auto value_of = [&](const std::string &key) {
    auto k = header.find("'" + key + "'");
    DALI_ENFORCE(k != std::string::npos, ::dali::make_string(path, ": .npy header lacks ", key));
    return header.substr(header.find(':', k) + 1);
  };
  std::string descr = value_of("descr");
  descr = descr.substr(descr.find('\'') + 1);
  descr = descr.substr(0, descr.find('\''));
  h.type = TypeFromDescr(descr, &h.item_bytes);
  DALI_ENFORCE(h.type != DALI_NO_TYPE, ::dali::make_string(path, ": unsupported dtype ", descr));
  DALI_ENFORCE(value_of("fortran_order").find("False") < 2,
               ::dali::make_string(path, ": Fortran-ordered arrays are not supported"));
  std::string shape = value_of("shape");
  shape = shape.substr(shape.find('(') + 1, shape.find(')') - shape.find('(') - 1);
  std::vector<int64_t> dims;
  size_t pos = 0;
  while (pos < shape.size()) {
    size_t end = shape.find(',', pos);
    if (end == std::string::npos) end = shape.size();
    std::string item = shape.substr(pos, end - pos);
    if (item.find_first_of("0123456789") != std::string::npos) dims.push_back(std::stoll(item));
    pos = end + 1;
  }
  DALI_ENFORCE(dims.size() == 2, ::dali::make_string(path, ": expected a 2-D array, found ", dims.size(), "-D"));
  h.num_rows = dims[0];
  h.num_columns = dims[1];
  return h;
}

class WindowRead : public ::dali::StatelessOperator<::dali::CPUBackend> {
 public:
  explicit WindowRead(const ::dali::OpSpec &spec)
      : ::dali::StatelessOperator<::dali::CPUBackend>(spec),
        files_(spec.GetRepeatedArgument<std::string>("files")),
        rows_(spec.GetArgument<int>("rows")),
        columns_(spec.GetArgument<int>("columns")),
        headers_(files_.size()),
        parsed_(files_.size(), false) {
    DALI_ENFORCE(rows_ > 0, "rows must be positive");
  }

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    const auto &uids = ws.Input<::dali::CPUBackend>(0);
    const auto &starts = ws.Input<::dali::CPUBackend>(1);
    int n = uids.num_samples();
    uids_.resize(n);
    starts_.resize(n);
    for (int i = 0; i < n; i++) {
      uids_[i] = ScalarAt(uids, i, "clip uid");
      starts_[i] = ScalarAt(starts, i, "first row");
    }
    ::dali::DALIDataType type = DALI_NO_TYPE;
    int64_t columns = 0;
    for (int i = 0; i < n; i++) {
      const NpyHeader &h = Header(uids_[i]);
      int64_t want = columns_ > 0 ? columns_ : h.num_columns;
      DALI_ENFORCE(want <= h.num_columns, ::dali::make_string(files_[uids_[i]], " has ", h.num_columns,
                                                               " columns, ", want, " requested"));
      DALI_ENFORCE(starts_[i] >= 0 && starts_[i] + rows_ <= h.num_rows,
                   ::dali::make_string("rows [", starts_[i], ", ", starts_[i] + rows_, ") are outside ",
                                       files_[uids_[i]], " (", h.num_rows, " rows)"));
      if (i == 0) {
        type = h.type;
        columns = want;
      }
      DALI_ENFORCE(h.type == type && want == columns,
                   ::dali::make_string(files_[uids_[i]], " differs in dtype or width from the other files"));
    }
    output_desc.resize(1);
    output_desc[0].type = type;
    output_desc[0].shape = ::dali::uniform_list_shape(n, ::dali::TensorShape<2>{rows_, columns});
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override {
    auto &out = ws.Output<::dali::CPUBackend>(0);
    auto &pool = ws.GetThreadPool();
    int n = out.num_samples();
    for (int i = 0; i < n; i++) {
      const NpyHeader &h = Header(uids_[i]);
      const std::string &path = files_[uids_[i]];
      int64_t take = out.tensor_shape(i)[1] * h.item_bytes;
      int64_t row_bytes = h.num_columns * h.item_bytes;
      int64_t offset = h.data_offset + starts_[i] * row_bytes;
      char *dst = static_cast<char *>(out.raw_mutable_tensor(i));
      pool.AddWork([=, &path](int) {
        int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
        DALI_ENFORCE(fd >= 0, ::dali::make_string("cannot open ", path, ": ", std::strerror(errno)));
        if (take == row_bytes) {  // whole rows: one contiguous read
          ReadFully(fd, dst, take * rows_, offset, path);
        } else {  // a prefix of each row (e.g. the motion columns of the reference frame)
          for (int r = 0; r < rows_; r++) ReadFully(fd, dst + r * take, take, offset + r * row_bytes, path);
        }
        close(fd);
      }, take * rows_);
    }
    pool.RunAll();
  }

 private:
  static int64_t ScalarAt(const ::dali::TensorList<::dali::CPUBackend> &in, int i, const char *what) {
    DALI_ENFORCE(in.tensor_shape(i).num_elements() == 1, ::dali::make_string(what, " must be a scalar"));
    switch (in.type()) {
      case DALI_INT32: return *in.tensor<int32_t>(i);
      case DALI_INT64: return *in.tensor<int64_t>(i);
      default: DALI_FAIL(::dali::make_string(what, " must be int32 or int64"));
    }
  }

  static void ReadFully(int fd, char *dst, int64_t bytes, int64_t offset, const std::string &path) {
    while (bytes > 0) {
      ssize_t got = pread(fd, dst, bytes, offset);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        int err = errno;
        close(fd);
        DALI_FAIL(::dali::make_string("short read from ", path, got < 0 ? std::strerror(err) : " (file truncated)"));
      }
      dst += got;
      offset += got;
      bytes -= got;
    }
  }

  const NpyHeader &Header(int64_t uid) {
    DALI_ENFORCE(uid >= 0 && uid < static_cast<int64_t>(files_.size()) && !files_[uid].empty(),
                 ::dali::make_string("no file for clip uid ", uid));
    std::lock_guard<std::mutex> lock(mutex_);
    if (!parsed_[uid]) {
      headers_[uid] = ParseHeader(files_[uid]);
      parsed_[uid] = true;
    }
    return headers_[uid];
  }

  std::vector<std::string> files_;
  int rows_;
  int columns_;
  std::vector<NpyHeader> headers_;  // one small record per clip, parsed on first use
  std::vector<bool> parsed_;
  std::mutex mutex_;
  std::vector<int64_t> uids_, starts_;
};

}  // namespace dali_float

DALI_REGISTER_OPERATOR(DaliFloatWindowRead, ::dali_float::WindowRead, ::dali::CPU);

DALI_SCHEMA(DaliFloatWindowRead)
    .DocStr("Reads `rows` consecutive rows (first `columns` values of each) of 2-D .npy files with pread.")
    .NumInput(2)
    .NumOutput(1)
    .MakeStateless()
    .AddArg("files", "Paths of the .npy files, indexed by clip uid (empty where unused).",
            DALI_STRING_VEC)
    .AddArg("rows", "Rows to read per sample.", DALI_INT32)
    .AddOptionalArg("columns", "Leading columns to read per row (0: all).", 0);
