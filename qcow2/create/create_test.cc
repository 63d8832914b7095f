// CreateImage() against qemu-img: for a matrix of options, the image we make
// must pass `qemu-img check`, give the same `qemu-img info --output=json` as
// the one qemu-img makes with the same options (all but actual-size), have the
// same file size (byte-identical where our layout is QEMU's), accept writes
// through qemu-io and still check clean afterwards, and reopen with OpenImage.
// Bad options must each give a clear error.
#include "qcow2/create/create.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>

#include "qcow2/open_image.h"
#include "qcow2/sync_env.h"
#include "qcow2/testing/mem_env.h"

namespace uq::qcow2 {
namespace {

using Prealloc = CreateOptions::Preallocation;

// What the comparison with qemu-img's image of the same options expects.
enum class Expect {
  kIdentical,     // byte for byte (image and data file)
  kSameFileSize,  // same size, different placement of refcount blocks
  kNotLarger,     // QEMU had to grow its refcount table; we did not
};

struct Case {
  std::string name;
  std::string opts;  // the -o list, for qemu-img and ParseCreateOptions alike
  std::string size;  // qemu-img's size argument; "" for none (from backing)
  Expect expect = Expect::kIdentical;
  // Set up before creating, in both directories (e.g. a backing file).
  std::string setup;
  // qemu-img's -o list when it must differ from ours (e.g. backing_fmt).
  std::string qemu_opts;
};

class CreateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    dir_ = fmt::format("{}/create-{}", tmp ? tmp : "/tmp",
                       ::testing::UnitTest::GetInstance()->current_test_info()->name());
    ASSERT_EQ(std::system(fmt::format("rm -rf '{0}' && mkdir -p '{0}'", dir_).c_str()), 0);
  }

  // Images are sparse but some are large; keep them only to debug failures.
  void TearDown() override {
    if (!HasFailure()) {
      EXPECT_EQ(std::system(fmt::format("rm -rf '{}'", dir_).c_str()), 0);
    }
  }

  // Runs `cmd` in `dir` (relative to dir_); returns its exit status and
  // appends its stdout and stderr to *out if given.
  int Sh(const std::string& cmd, const std::string& dir = "", std::string* out = nullptr) {
    std::string full = fmt::format("cd '{}/{}' && ( {} ) 2>&1", dir_, dir, cmd);
    FILE* p = ::popen(full.c_str(), "r");
    if (p == nullptr) return -1;
    char buf[4096];
    std::string text;
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) text.append(buf, n);
    int rc = ::pclose(p);
    if (out) *out += text;
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  }
  void Run(const std::string& cmd, const std::string& dir = "") {
    std::string out;
    ASSERT_EQ(Sh(cmd, dir, &out), 0) << cmd << "\n" << out;
  }
  std::string Output(const std::string& cmd, const std::string& dir = "") {
    std::string out;
    EXPECT_EQ(Sh(cmd, dir, &out), 0) << cmd << "\n" << out;
    return out;
  }
  std::string P(const std::string& rel) { return dir_ + "/" + rel; }
  static uint64_t FileSize(const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : ~uint64_t{0};
  }
  // Whether two files hold the same bytes. Reads only the ranges where
  // either has data (SEEK_DATA), so sparse terabyte images compare quickly.
  static bool SameBytes(const std::string& a, const std::string& b) {
    if (FileSize(a) != FileSize(b)) return false;
    const uint64_t size = FileSize(a);
    int fa = ::open(a.c_str(), O_RDONLY), fb = ::open(b.c_str(), O_RDONLY);
    bool same = fa >= 0 && fb >= 0;
    std::vector<char> ba(1 << 20), bb(1 << 20);
    for (int scan : {fa, fb}) {
      off_t pos = 0;
      while (same && static_cast<uint64_t>(pos) < size) {
        off_t data = ::lseek(scan, pos, SEEK_DATA);
        if (data < 0) break;  // no more data
        off_t hole = ::lseek(scan, data, SEEK_HOLE);
        for (off_t off = data; same && off < hole;) {
          size_t n = static_cast<size_t>(std::min<off_t>(hole - off, ba.size()));
          same = ::pread(fa, ba.data(), n, off) == static_cast<ssize_t>(n) &&
                 ::pread(fb, bb.data(), n, off) == static_cast<ssize_t>(n) &&
                 std::memcmp(ba.data(), bb.data(), n) == 0;
          off += static_cast<off_t>(n);
        }
        pos = hole;
      }
    }
    if (fa >= 0) ::close(fa);
    if (fb >= 0) ::close(fb);
    return same;
  }
  static std::string Slurp(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  // `qemu-img info --output=json` without the actual-size line, with the
  // directory replaced by DIR.
  std::string Info(const std::string& dir, const std::string& image) {
    std::string json = Output(fmt::format("qemu-img info --output=json '{}'", image), dir);
    std::string out, line;
    std::string abs = P(dir);
    for (size_t pos = 0; (pos = json.find(abs, pos)) != std::string::npos;) {
      json.replace(pos, abs.size(), "DIR");
    }
    std::istringstream lines(json);
    while (std::getline(lines, line)) {
      if (line.find("\"actual-size\"") == std::string::npos) out += line + "\n";
    }
    return out;
  }
  void ExpectChecksClean(const std::string& dir, const std::string& image) {
    std::string out;
    EXPECT_EQ(Sh(fmt::format("qemu-img check '{}'", image), dir, &out), 0) << out;
    EXPECT_NE(out.find("No errors were found on the image."), std::string::npos) << out;
  }

  Status CreateWith(const std::string& opts, const std::string& size, const std::string& path) {
    CreateOptions base;
    base.path = path;
    // qemu-img runs in the image's directory: a relative data_file lands there.
    base.working_dir = path.substr(0, path.rfind('/'));
    Result<CreateOptions> o = ParseCreateOptions(opts, base);
    if (!o.ok()) return o.status();
    if (!size.empty()) {
      Result<CreateOptions> sized = ParseCreateOptions("size=" + size, *o);
      if (!sized.ok()) return sized.status();
      o = std::move(sized);
    }
    return BlockOn(CreateImage(SyncEnv(), *o));
  }

  // Makes the image with qemu-img in q/ and with CreateImage in o/ (same
  // relative names, so data file and backing names match) and compares.
  void Compare(const Case& c) {
    SCOPED_TRACE(c.name + ": -o " + c.opts + " " + c.size);
    Run("mkdir -p q o");
    if (!c.setup.empty()) {
      Run(c.setup, "q");
      Run(c.setup, "o");
    }
    std::string qopts = c.qemu_opts.empty() ? c.opts : c.qemu_opts;
    Run(fmt::format("qemu-img create -q -f qcow2 {} img.qcow2 {}",
                    qopts.empty() ? "" : "-o '" + qopts + "'", c.size),
        "q");
    Status st = CreateWith(c.opts, c.size, P("o/img.qcow2"));
    ASSERT_TRUE(st.ok()) << st.ToString();

    ExpectChecksClean("o", "img.qcow2");
    EXPECT_EQ(Info("o", "img.qcow2"), Info("q", "img.qcow2"));

    uint64_t ours = FileSize(P("o/img.qcow2")), theirs = FileSize(P("q/img.qcow2"));
    switch (c.expect) {
      case Expect::kIdentical:
        EXPECT_EQ(ours, theirs);
        EXPECT_TRUE(SameBytes(P("o/img.qcow2"), P("q/img.qcow2"))) << "image bytes differ";
        if (c.opts.find("data_file=") != std::string::npos) {
          EXPECT_TRUE(SameBytes(P("o/img.raw"), P("q/img.raw"))) << "data file bytes differ";
        }
        break;
      case Expect::kSameFileSize:
        EXPECT_EQ(ours, theirs);
        break;
      case Expect::kNotLarger:
        EXPECT_LE(ours, theirs);
        break;
    }
    if (c.expect != Expect::kIdentical) {
      std::printf("%s: ours %llu bytes, qemu-img's %llu bytes, %s\n", c.name.c_str(),
                  static_cast<unsigned long long>(ours), static_cast<unsigned long long>(theirs),
                  SameBytes(P("o/img.qcow2"), P("q/img.qcow2")) ? "identical" : "different layout");
    }
    if (c.opts.find("data_file=") != std::string::npos) {
      EXPECT_EQ(FileSize(P("o/img.raw")), FileSize(P("q/img.raw"))) << "data file sizes differ";
    }

    // Reopen through the engine.
    uint64_t virtual_size = 0;
    {
      auto dev = BlockOn(
          OpenImage(P("o/img.qcow2"), ImageOptions{.env = SyncEnv(), .working_dir = P("o")}));
      ASSERT_TRUE(dev.ok()) << dev.status().ToString();
      virtual_size = (*dev)->size();
    }
    if (virtual_size == 0) return;

    // Write and read back through QEMU, check again, and read the data back
    // through the engine.
    const uint64_t n = std::min<uint64_t>(virtual_size, 65536);
    Run(fmt::format("qemu-io -c 'write -P 0x5a 0 {0}' -c 'read -P 0x5a 0 {0}' "
                    "img.qcow2 | grep -q 'read {0}/{0}'",
                    n),
        "o");
    ExpectChecksClean("o", "img.qcow2");
    auto dev =
        BlockOn(OpenImage(P("o/img.qcow2"), ImageOptions{.env = SyncEnv(), .working_dir = P("o")}));
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    std::vector<std::byte> buf(n);
    Status read = BlockOn((*dev)->Read(0, buf));
    ASSERT_TRUE(read.ok()) << read.ToString();
    EXPECT_EQ(std::count(buf.begin(), buf.end(), std::byte{0x5a}), static_cast<long>(n));
  }

  std::string dir_;
};

// --- The comparison matrix ---------------------------------------------------

TEST_F(CreateTest, DefaultOptionsAreByteIdentical) { Compare({"default", "", "1G"}); }

TEST_F(CreateTest, ClusterSizes) {
  for (auto [cs, size] : {std::pair{"512", "1G"},
                          {"4k", "1G"},
                          {"64k", "1G"},
                          {"2M", "1T"},
                          {"512", "1000001"},
                          {"4k", "100M"}}) {
    Run("rm -rf q o");
    Compare({fmt::format("cluster_size={}", cs), fmt::format("cluster_size={}", cs), size});
  }
}

TEST_F(CreateTest, Compat010) {
  Compare({"v2", "compat=0.10", "1G"});
  Run("rm -rf q o");
  Compare({"v2 4k", "compat=0.10,cluster_size=4k", "3G"});
}

TEST_F(CreateTest, RefcountWidths) {
  for (int bits : {1, 2, 4, 8, 16, 32, 64}) {
    Run("rm -rf q o");
    Compare({fmt::format("refcount_bits={}", bits), fmt::format("refcount_bits={}", bits), "10G"});
  }
}

TEST_F(CreateTest, RefcountWidthsWithSmallClusters) {
  // The L1 table (512 clusters) needs several refcount blocks. QEMU puts
  // them after the L1 table in the order its allocator recurses in; here,
  // with 16 bits or less, that is our order too. Not in general (see below).
  for (int bits : {1, 2, 4, 8, 16}) {
    Run("rm -rf q o");
    Compare({fmt::format("512/{}", bits), fmt::format("cluster_size=512,refcount_bits={}", bits),
             "1G"});
  }
  for (int bits : {32, 64}) {
    Run("rm -rf q o");
    Compare({fmt::format("512/{}", bits), fmt::format("cluster_size=512,refcount_bits={}", bits),
             "1G", Expect::kSameFileSize});
  }
  // A 2048-cluster L1 table: 9 refcount blocks of 16 bits, 33 of 64 bits.
  for (int bits : {1, 16, 64}) {
    Run("rm -rf q o");
    Compare({fmt::format("512/{} 4G", bits), fmt::format("cluster_size=512,refcount_bits={}", bits),
             "4G", Expect::kSameFileSize});
  }
  // The largest L1 table (32 MiB): QEMU grows its refcount table.
  Run("rm -rf q o");
  Compare({"512/16 128G", "cluster_size=512", "128G", Expect::kNotLarger});
}

TEST_F(CreateTest, ExtendedL2) {
  Compare({"extl2", "extended_l2=on", "1G"});
  Run("rm -rf q o");
  Compare({"extl2 16k", "extended_l2=on,cluster_size=16k", "5G"});
}

TEST_F(CreateTest, ZstdAndLazyRefcounts) {
  Compare({"zstd", "compression_type=zstd", "1G"});
  Run("rm -rf q o");
  Compare({"lazy", "lazy_refcounts=on", "1G"});
  Run("rm -rf q o");
  Compare({"everything", "lazy_refcounts=on,compression_type=zstd,extended_l2=on,refcount_bits=8",
           "1G"});
}

TEST_F(CreateTest, SizeZeroAndOddSizes) {
  Compare({"size 0", "", "0"});
  for (std::string size : {"1000001", "1", "511", "513", "65537"}) {
    Run("rm -rf q o");
    Compare({"odd " + size, "", size});
  }
  Run("rm -rf q o");
  Compare({"odd 512", "cluster_size=512", "1000001"});
}

TEST_F(CreateTest, DataFile) {
  Compare({"data file", "data_file=img.raw", "10M"});
  Run("rm -rf q o");
  Compare({"data file odd", "data_file=img.raw", "1000001"});
  Run("rm -rf q o");
  // data_file_raw implies preallocation=metadata: a 1:1 mapping.
  Compare({"data file raw", "data_file=img.raw,data_file_raw=on", "1000001"});
  Run("rm -rf q o");
  Compare({"data file raw 2 tables", "data_file=img.raw,data_file_raw=on,cluster_size=4k", "5M"});
  Run("rm -rf q o");
  Compare({"data file prealloc", "data_file=img.raw,preallocation=metadata", "3G"});
  Run("rm -rf q o");
  Compare({"data file raw extl2", "data_file=img.raw,data_file_raw=on,extended_l2=on", "5M"});
}

TEST_F(CreateTest, DataFileRawReadsThroughToTheDataFile) {
  ASSERT_TRUE(CreateWith("data_file=img.raw,data_file_raw=on", "1M", P("img.qcow2")).ok());
  Run("qemu-io -f raw -c 'write -P 0x42 4096 8192' img.raw");
  Run("qemu-io -c 'read -P 0x42 4096 8192' -c 'read -P 0 0 4096' img.qcow2 | "
      "grep -q 'read 8192/8192'");
  ExpectChecksClean("", "img.qcow2");
}

TEST_F(CreateTest, ExistingDataFileIsTruncated) {
  Run("head -c 3000000 /dev/urandom > img.raw");
  ASSERT_TRUE(CreateWith("data_file=img.raw", "1M", P("img.qcow2")).ok());
  EXPECT_EQ(FileSize(P("img.raw")), 1u << 20);
  EXPECT_TRUE(Slurp(P("img.raw")) == std::string(1 << 20, '\0'));
}

TEST_F(CreateTest, BackingFile) {
  const std::string setup =
      "qemu-img create -q -f qcow2 base.qcow2 7M && qemu-io -c 'write -P 0x11 "
      "0 1M' base.qcow2 >/dev/null"
      " && qemu-img create -q -f raw base.raw 3000001";
  Compare({"backing qcow2", "backing_file=base.qcow2,backing_fmt=qcow2", "20M", Expect::kIdentical,
           setup});
  Run("rm -rf q o");
  Compare({"backing size from qcow2", "backing_file=base.qcow2,backing_fmt=qcow2", "",
           Expect::kIdentical, setup});
  Run("rm -rf q o");
  Compare({"backing raw", "backing_file=base.raw,backing_fmt=raw", "", Expect::kIdentical, setup});
  Run("rm -rf q o");
  // Without a format: qemu-img 7.2 refuses; we record the detected one.
  Compare({"backing no fmt", "backing_file=base.qcow2", "", Expect::kIdentical, setup,
           "backing_file=base.qcow2,backing_fmt=qcow2"});
  Run("rm -rf q o");
  Compare({"backing raw no fmt", "backing_file=base.raw", "5M", Expect::kIdentical, setup,
           "backing_file=base.raw,backing_fmt=raw"});
  Run("rm -rf q o");
  Compare({"backing v2", "compat=0.10,backing_file=base.qcow2,backing_fmt=qcow2", "",
           Expect::kIdentical, setup});
  Run("rm -rf q o");
  Compare({"backing and data file", "backing_file=base.qcow2,backing_fmt=qcow2,data_file=img.raw",
           "", Expect::kIdentical, setup});
  Run("rm -rf q o");
  // No feature table with 4k clusters: there is room for the name.
  Compare({"backing 512", "cluster_size=512,backing_file=base.qcow2,backing_fmt=qcow2", "",
           Expect::kIdentical, setup});
  Run("rm -rf q o");
  Compare({"backing prealloc extl2",
           "extended_l2=on,preallocation=metadata,backing_file=base.qcow2,"
           "backing_fmt=qcow2",
           "", Expect::kIdentical, setup});
  // Reads come from the backing file through the preallocated image.
  Run("qemu-io -c 'read -P 0x11 0 1M' -c 'read -P 0 1M 6M' img.qcow2 | grep -q "
      "'read 6291456/6291456'",
      "o");
}

TEST_F(CreateTest, Preallocation) {
  // One L2 table: our interleaved layout is QEMU's.
  Compare({"prealloc odd", "preallocation=metadata", "1000001"});
  Run("rm -rf q o");
  Compare({"prealloc 1G", "preallocation=metadata", "1G"});
  Run("rm -rf q o");
  Compare({"prealloc 0", "preallocation=metadata", "0"});
  Run("rm -rf q o");
  Compare({"prealloc extl2", "preallocation=metadata,extended_l2=on", "1G"});
  Run("rm -rf q o");
  Compare({"prealloc 4k 2 tables", "preallocation=metadata,cluster_size=4k", "3M"});
  Run("rm -rf q o");
  // Many refcount blocks: QEMU interleaves them with the data, we put them
  // last.
  Compare({"prealloc 512", "preallocation=metadata,cluster_size=512", "4M", Expect::kSameFileSize});
  Run("rm -rf q o");
  Compare({"prealloc 512/64", "preallocation=metadata,cluster_size=512,refcount_bits=64", "2M",
           Expect::kNotLarger});
  Run("rm -rf q o");
  Compare({"prealloc 512/1", "preallocation=metadata,cluster_size=512,refcount_bits=1", "8M",
           Expect::kSameFileSize});
  Run("rm -rf q o");
  Compare({"prealloc 64k 10G", "preallocation=metadata", "10G", Expect::kSameFileSize});
  Run("rm -rf q o");
  Compare({"prealloc v2", "preallocation=metadata,compat=0.10,cluster_size=16k", "100M"});
}

TEST_F(CreateTest, PreallocatedTerabyteIsFast) {
  auto start = std::chrono::steady_clock::now();
  Compare({"1T 2M", "preallocation=metadata,cluster_size=2M", "1T"});
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 30) << "creating, checking and comparing took " << seconds << " s";
}

TEST_F(CreateTest, PreallocatedTerabyteOurPartIsFast) {
  CreateOptions o;
  o.path = P("big.qcow2");
  o.size = 1ull << 40;
  o.cluster_size = 2 << 20;
  o.preallocation = Prealloc::kMetadata;
  auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(BlockOn(CreateImage(SyncEnv(), o)).ok());
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("created 1 TiB, 2 MiB clusters, preallocated in %.2f s\n", seconds);
  EXPECT_LT(seconds, 5);
  o.path = P("big64k.qcow2");
  o.cluster_size = 65536;
  start = std::chrono::steady_clock::now();
  ASSERT_TRUE(BlockOn(CreateImage(SyncEnv(), o)).ok());
  seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("created 1 TiB, 64 KiB clusters, preallocated in %.2f s\n", seconds);
  EXPECT_LT(seconds, 20) << "1 TiB with 64k clusters (128 MiB of L2 tables)";
  ExpectChecksClean("", "big64k.qcow2");
}

// Several GiB of 512-byte clusters with 64-bit refcounts: ~8.6M clusters,
// ~134K refcount blocks, a refcount table of ~2K clusters. qemu-img takes
// many minutes for this, so it is compared with its unpreallocated image
// (info shows no difference) and checked.
TEST_F(CreateTest, PreallocatedMultiGiBSmallClusters64BitRefcounts) {
  Run("mkdir -p q o");
  Run("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 "
      "img.qcow2 4G",
      "q");
  auto start = std::chrono::steady_clock::now();
  Status st = CreateWith("cluster_size=512,refcount_bits=64,preallocation=metadata", "4G",
                         P("o/img.qcow2"));
  ASSERT_TRUE(st.ok()) << st.ToString();
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "created 4 GiB, 512-byte clusters, 64-bit refcounts, preallocated in "
      "%.2f s\n",
      seconds);
  EXPECT_LT(seconds, 30);
  EXPECT_EQ(Info("o", "img.qcow2"), Info("q", "img.qcow2"));
  std::string check = Output("qemu-img check img.qcow2", "o");
  EXPECT_NE(check.find("No errors were found"), std::string::npos) << check;
  EXPECT_NE(check.find("8388608/8388608 = 100.00% allocated"), std::string::npos) << check;
  Run("qemu-io -c 'write -P 0x5a 4095M 64k' -c 'read -P 0x5a 4095M 64k' "
      "img.qcow2 | grep -q 'read 65536/65536'",
      "o");
  ExpectChecksClean("o", "img.qcow2");
}

TEST_F(CreateTest, TooLarge) {
  CreateOptions o;
  o.path = P("a.qcow2");
  o.cluster_size = 512;
  o.size = 128ull << 30;  // L1 exactly 32 MiB: fine
  EXPECT_TRUE(BlockOn(CreateImage(SyncEnv(), o)).ok());
  ExpectChecksClean("", "a.qcow2");
  o.size = (128ull << 30) + 512;
  Status st = BlockOn(CreateImage(SyncEnv(), o));
  EXPECT_TRUE(st.IsInvalidArgument());
  EXPECT_EQ(st.message(),
            "The image size is too large for file format 'qcow2' (try using a "
            "larger cluster size)");
  o.size = 1ull << 62;
  EXPECT_TRUE(BlockOn(CreateImage(SyncEnv(), o)).IsInvalidArgument());
  // The refcount table would exceed 8 MiB.
  o.size = 64ull << 30;
  o.refcount_bits = 64;
  o.preallocation = Prealloc::kMetadata;
  st = BlockOn(CreateImage(SyncEnv(), o));
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
}

// --- Reopening and the Env seam ----------------------------------------------

TEST_F(CreateTest, ReopensWithOpenImageAndReadsZeros) {
  CreateOptions o;
  o.path = P("a.qcow2");
  o.size = 1000001;
  o.cluster_size = 4096;
  o.preallocation = Prealloc::kMetadata;
  ASSERT_TRUE(BlockOn(CreateImage(SyncEnv(), o)).ok());
  auto dev = BlockOn(OpenImage(o.path, ImageOptions{.env = SyncEnv()}));
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  EXPECT_EQ((*dev)->size(), 1000448u);
  std::vector<std::byte> buf(1000448, std::byte{1});
  ASSERT_TRUE(BlockOn((*dev)->Read(0, buf)).ok());
  EXPECT_EQ(std::count(buf.begin(), buf.end(), std::byte{0}), static_cast<long>(buf.size()));
}

TEST_F(CreateTest, DeferredCompletionEnvGivesTheSameBytes) {
  testing::MemEnvOptions mo;
  mo.completion = testing::MemEnvOptions::Completion::kDeferred;
  mo.seed = 7;
  testing::MemEnv env(mo);
  for (std::string opts : {"", "preallocation=metadata,cluster_size=4k",
                           "cluster_size=512,refcount_bits=2,preallocation=metadata",
                           "data_file=d.raw,data_file_raw=on"}) {
    SCOPED_TRACE(opts);
    Run("rm -f a.qcow2 d.raw");
    ASSERT_TRUE(CreateWith(opts, "3M", P("a.qcow2")).ok());
    CreateOptions base;
    base.path = "/mem/a.qcow2";
    Result<CreateOptions> o =
        ParseCreateOptions(opts.empty() ? "size=3M" : opts + ",size=3M", base);
    ASSERT_TRUE(o.ok());
    Status st = BlockOn(CreateImage(&env, *o), &env);
    ASSERT_TRUE(st.ok()) << st.ToString();
    std::vector<std::byte> bytes = env.Contents("/mem/a.qcow2");
    std::string mem(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    std::string disk = Slurp(P("a.qcow2"));
    EXPECT_TRUE(mem == disk);
  }
}

// --- Parsing and validation
// ---------------------------------------------------

TEST(ParseCreateOptionsTest, ParsesEveryKey) {
  CreateOptions base;
  base.path = "x.qcow2";
  auto o = ParseCreateOptions(
      "size=1.5G,compat=1.1,cluster_size=2M,refcount_bits=0x20,extended_l2=on,"
      "compression_type=zstd,"
      "lazy_refcounts=yes,data_file=a,,b.raw,preallocation=metadata",
      base);
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(o->size, (3ull << 30) / 2);
  EXPECT_EQ(o->cluster_size, 2u << 20);
  EXPECT_EQ(o->refcount_bits, 32u);
  EXPECT_TRUE(o->extended_l2);
  EXPECT_EQ(o->compression_type, "zstd");
  EXPECT_TRUE(o->lazy_refcounts);
  EXPECT_EQ(o->data_file, "a,b.raw");
  EXPECT_EQ(o->preallocation, Prealloc::kMetadata);

  o = ParseCreateOptions("backing_file=b.qcow2,backing_fmt=raw,compat=v2,cluster_size=512", base);
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(o->backing_file, "b.qcow2");
  EXPECT_EQ(o->backing_format, "raw");
  EXPECT_EQ(o->compat, "0.10");
  EXPECT_EQ(o->cluster_size, 512u);
  EXPECT_FALSE(o->size.has_value());

  o = ParseCreateOptions("cluster_size=64k,cluster_size=4096b,refcount_bits=010,lazy_refcounts",
                         base);
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(o->cluster_size, 4096u);
  EXPECT_EQ(o->refcount_bits, 8u);
  EXPECT_TRUE(o->lazy_refcounts);
  o = ParseCreateOptions("nolazy_refcounts", *o);
  ASSERT_TRUE(o.ok());
  EXPECT_FALSE(o->lazy_refcounts);
  // The base is kept where the list says nothing.
  EXPECT_EQ(o->cluster_size, 4096u);
  o = ParseCreateOptions("", *o);
  ASSERT_TRUE(o.ok());
  o = ParseCreateOptions("encryption=off,nocow=off,noencryption", *o);
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  o = ParseCreateOptions("size=0", base);
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->size, 0u);
}

void ExpectError(std::string_view list, std::string_view message,
                 Code code = Code::kInvalidArgument) {
  CreateOptions base;
  base.path = "x.qcow2";
  auto o = ParseCreateOptions(list, base);
  ASSERT_FALSE(o.ok()) << list;
  EXPECT_EQ(o.status().code(), code) << list << ": " << o.status().ToString();
  EXPECT_NE(o.status().message().find(message), std::string::npos)
      << list << ": got \"" << o.status().message() << "\", want \"" << message << "\"";
}

TEST(ParseCreateOptionsTest, BadOptionsGiveQemusErrors) {
  ExpectError("foo=bar", "Invalid parameter 'foo'");
  ExpectError("cluster_size", "Parameter 'cluster_size' expects a non-negative number");
  ExpectError("cluster_size=abc", "Parameter 'cluster_size' expects a non-negative number");
  ExpectError("cluster_size=1k5", "Parameter 'cluster_size' expects a non-negative number");
  ExpectError("cluster_size=99999999999999999999",
              "Value '99999999999999999999' is out of range for parameter 'cluster_size'");
  ExpectError("lazy_refcounts=maybe", "Parameter 'lazy_refcounts' expects 'on' or 'off'");
  ExpectError("refcount_bits=abc", "Parameter 'refcount_bits' expects a number");
  ExpectError("compression_type=lz4", "Parameter 'compression_type' does not accept value 'lz4'");
  ExpectError("preallocation=bogus", "Parameter 'preallocation' does not accept value 'bogus'");
  ExpectError("preallocation=full", "preallocation mode 'full' is not supported",
              Code::kNotSupported);
  ExpectError("preallocation=falloc", "not supported", Code::kNotSupported);
  ExpectError("encryption=on", "legacy AES-encrypted images", Code::kNotSupported);
  ExpectError("encrypt.format=aes", "legacy AES-encrypted images", Code::kNotSupported);
  ExpectError("compat=0.11", "Invalid compatibility level: '0.11'");
  ExpectError("lazy_refcounts=on,", "Invalid option list");
  ExpectError(",lazy_refcounts=on", "Invalid option list");
  ExpectError("backing_file=", "Expected backing file name, got empty string");

  const std::string v3 = "compatibility level 1.1 and above (use version=v3 or greater)";
  for (auto cs : {"1000", "256", "4M", "1.5k", "0"}) {
    ExpectError(fmt::format("cluster_size={}", cs),
                "Cluster size must be a power of two between 512 and 2048k");
  }
  for (auto bits : {"0", "3", "128", "48"}) {
    ExpectError(fmt::format("refcount_bits={}", bits),
                "Refcount width must be a power of two and may not exceed 64 bits");
  }
  ExpectError("compat=0.10,refcount_bits=8",
              "Different refcount widths than 16 bits require compatibility "
              "level 1.1 or above");
  ExpectError("extended_l2=on,cluster_size=8k",
              "Extended L2 entries are only supported with cluster sizes of at "
              "least 16384 bytes");
  ExpectError("extended_l2=on,compat=0.10", "Extended L2 entries are only supported with " + v3);
  ExpectError("compression_type=zstd,compat=0.10",
              "Non-zlib compression type is only supported with " + v3);
  ExpectError("lazy_refcounts=on,compat=0.10", "Lazy refcounts only supported with " + v3);
  ExpectError("data_file=d.raw,compat=0.10", "External data files are only supported with " + v3);
  ExpectError("data_file_raw=on", "data-file-raw requires data-file");
  ExpectError("data_file=d.raw,data_file_raw=on,backing_file=b.qcow2",
              "Backing file and data-file-raw cannot be used at the same time");
  ExpectError("preallocation=metadata,backing_file=b.qcow2",
              "Backing file and preallocation can only be used at the same "
              "time if extended_l2 is on");
  ExpectError("backing_fmt=qcow2", "Backing format cannot be used without backing file");
}

TEST(ParseCreateOptionsTest, QemuAgreesTheOptionsAreBad) {
  // Every list rejected above is rejected by qemu-img too (exit status 1).
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::string dir = fmt::format("{}/qemu-agrees", tmp ? tmp : "/tmp");
  ASSERT_EQ(std::system(fmt::format("rm -rf '{0}' && mkdir -p '{0}'", dir).c_str()), 0);
  for (std::string list :
       {"foo=bar", "cluster_size=abc", "lazy_refcounts=maybe", "compression_type=lz4",
        "preallocation=bogus", "cluster_size=1000", "refcount_bits=3",
        "compat=0.10,refcount_bits=8", "extended_l2=on,cluster_size=8k",
        "extended_l2=on,compat=0.10", "compression_type=zstd,compat=0.10",
        "lazy_refcounts=on,compat=0.10", "data_file=d.raw,compat=0.10", "data_file_raw=on",
        "backing_fmt=qcow2", "compat=0.11"}) {
    std::string cmd = fmt::format(
        "cd '{}' && qemu-img create -q -f qcow2 -o '{}' x.qcow2 1M 2>/dev/null", dir, list);
    EXPECT_NE(std::system(cmd.c_str()), 0) << list;
  }
}

TEST_F(CreateTest, CreateImageErrors) {
  CreateOptions o;
  o.path = P("a.qcow2");
  // No size and no backing file.
  Status st = BlockOn(CreateImage(SyncEnv(), o));
  EXPECT_TRUE(st.IsInvalidArgument());
  EXPECT_NE(st.message().find("needs a size"), std::string::npos) << st.ToString();
  // A missing backing file; nothing is created.
  o.backing_file = "missing.qcow2";
  o.backing_format = "qcow2";
  st = BlockOn(CreateImage(SyncEnv(), o));
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("Could not open backing image"), std::string::npos) << st.ToString();
  EXPECT_NE(st.message().find("No such file"), std::string::npos) << st.ToString();
  EXPECT_EQ(FileSize(o.path), ~uint64_t{0});
  // The backing format does not match the file.
  Run("qemu-img create -q -f raw base.raw 1M");
  o.backing_file = "base.raw";
  o.backing_format = "qcow2";
  st = BlockOn(CreateImage(SyncEnv(), o));
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("Could not open backing image"), std::string::npos) << st.ToString();
  // Validation also happens in CreateImage for options built by hand.
  CreateOptions bad;
  bad.path = P("b.qcow2");
  bad.size = 1 << 20;
  bad.refcount_bits = 12;
  EXPECT_TRUE(BlockOn(CreateImage(SyncEnv(), bad)).IsInvalidArgument());
  // A backing file name too long for a 512-byte header cluster.
  Run("qemu-img create -q -f qcow2 base.qcow2 1M");
  CreateOptions longname;
  longname.path = P("c.qcow2");
  longname.cluster_size = 512;
  longname.backing_file.emplace();
  for (int i = 0; i < 200; i++) *longname.backing_file += "./";
  *longname.backing_file += "base.qcow2";
  longname.backing_format = "qcow2";
  longname.size = 1 << 20;
  st = BlockOn(CreateImage(SyncEnv(), longname));
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  EXPECT_NE(st.message().find("do not fit in a cluster"), std::string::npos) << st.ToString();
  longname.cluster_size = 4096;  // fits
  st = BlockOn(CreateImage(SyncEnv(), longname));
  EXPECT_TRUE(st.ok()) << st.ToString();
  ExpectChecksClean("", "c.qcow2");
  // An image cannot be its own backing or data file.
  CreateOptions self;
  self.path = P("self.qcow2");
  self.size = 1 << 20;
  ASSERT_TRUE(BlockOn(CreateImage(SyncEnv(), self)).ok());
  self.backing_file = "self.qcow2";
  st = BlockOn(CreateImage(SyncEnv(), self));
  EXPECT_NE(st.message().find("cannot be its own backing file"), std::string::npos)
      << st.ToString();
  self.backing_file.reset();
  self.data_file = "./self.qcow2";
  self.working_dir = P("");  // where qemu-img would run: the image's directory
  st = BlockOn(CreateImage(SyncEnv(), self));
  EXPECT_NE(st.message().find("cannot be its own data file"), std::string::npos) << st.ToString();
  ExpectChecksClean("", "self.qcow2");  // untouched
  // An unwritable location.
  CreateOptions nodir;
  nodir.path = P("no/such/dir/a.qcow2");
  nodir.size = 1 << 20;
  st = BlockOn(CreateImage(SyncEnv(), nodir));
  EXPECT_TRUE(st.IsIoError()) << st.ToString();
}

}  // namespace
}  // namespace uq::qcow2
