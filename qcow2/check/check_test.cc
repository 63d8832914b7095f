// CheckImage against `qemu-img check` (QEMU 7.2, Debian qemu-utils): clean
// images of many kinds must report exactly what qemu-img reports; damaged
// images (made here by patching bytes) must get the same counts and exit
// code, and after our repair qemu-img must agree the image is as repaired as
// after its own.
#include "qcow2/check/check.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "base/endian.h"
#include "base/task.h"
#include "qcow2/format.h"
#include "qcow2/header.h"
#include "qcow2/refcount_codec.h"
#include "qcow2/snapshot_table.h"
#include "qcow2/sync_env.h"
#include "qcow2/testing/mem_env.h"
#include "qcow2/testing/scratch_dir.h"

namespace uq::qcow2 {
namespace {

constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;

// Raw access to a qcow2 file on the host, for damaging it on purpose.
class Patcher {
 public:
  explicit Patcher(const std::string& path) : fd_(::open(path.c_str(), O_RDWR)) {
    EXPECT_GE(fd_, 0) << path;
    cluster_bits = U32(20);
    cluster_size = uint64_t{1} << cluster_bits;
    l1_offset = U64(40);
    refcount_table_offset = U64(48);
    snapshots_offset = U64(64);
    incompatible = U32(4) >= 3 ? U64(72) : 0;
    refcount_order = U32(4) >= 3 ? U32(96) : 4;
    entry_bytes = (incompatible & kIncompatExtendedL2) ? 16 : 8;
  }
  ~Patcher() { ::close(fd_); }

  std::vector<std::byte> Read(uint64_t offset, size_t n) {
    std::vector<std::byte> b(n);
    EXPECT_EQ(::pread(fd_, b.data(), n, static_cast<off_t>(offset)), static_cast<ssize_t>(n));
    return b;
  }
  void Write(uint64_t offset, std::span<const std::byte> b) {
    EXPECT_EQ(::pwrite(fd_, b.data(), b.size(), static_cast<off_t>(offset)),
              static_cast<ssize_t>(b.size()));
  }
  uint64_t U64(uint64_t offset) { return LoadBE64(Read(offset, 8), 0); }
  uint32_t U32(uint64_t offset) { return LoadBE32(Read(offset, 4), 0); }
  void SetU64(uint64_t offset, uint64_t v) {
    std::byte b[8];
    StoreBE64(b, 0, v);
    Write(offset, b);
  }

  // Where the L2 entry for `guest_offset` lives.
  uint64_t L2EntryAddress(uint64_t guest_offset) {
    const uint64_t entries = cluster_size / entry_bytes;
    const uint64_t cluster = guest_offset >> cluster_bits;
    const uint64_t l2 = U64(l1_offset + cluster / entries * 8) & kOffsetMask;
    EXPECT_NE(l2, 0u) << "no L2 table for guest offset " << guest_offset;
    return l2 + cluster % entries * entry_bytes;
  }
  uint64_t L2Entry(uint64_t guest_offset) { return U64(L2EntryAddress(guest_offset)); }
  void SetL2Entry(uint64_t guest_offset, uint64_t v) { SetU64(L2EntryAddress(guest_offset), v); }
  uint64_t HostCluster(uint64_t guest_offset) {
    return (L2Entry(guest_offset) & kOffsetMask) >> cluster_bits;
  }

  // A cluster's stored refcount, through the refcount codec.
  uint64_t Refcount(uint64_t cluster) {
    auto [block, index] = Locate(cluster);
    return GetRefcount(Read(block, cluster_size), index, refcount_order);
  }
  void SetRefcountOf(uint64_t cluster, uint64_t value) {
    auto [block, index] = Locate(cluster);
    std::vector<std::byte> b = Read(block, cluster_size);
    SetRefcount(b, index, refcount_order, value);
    Write(block, b);
  }

  uint32_t cluster_bits;
  uint64_t cluster_size;
  uint64_t l1_offset;
  uint64_t refcount_table_offset;
  uint64_t snapshots_offset;
  uint64_t incompatible;
  uint32_t refcount_order;
  uint64_t entry_bytes;

 private:
  std::pair<uint64_t, uint64_t> Locate(uint64_t cluster) {
    const uint64_t per_block = RefcountEntriesPerBlock(cluster_bits, refcount_order);
    const uint64_t block = U64(refcount_table_offset + cluster / per_block * 8) & ~uint64_t{511};
    EXPECT_NE(block, 0u);
    return {block, cluster % per_block};
  }
  int fd_;
};

struct QemuCheck {
  int rc = -1;
  std::string out;                                        // stdout
  std::string err;                                        // stderr
  std::vector<std::pair<std::string, std::string>> json;  // in output order
};

class CheckTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = fmt::format("{}-{}", info->test_suite_name(), info->name());
    std::replace(name.begin(), name.end(), '/', '_');
    dir_ = fmt::format("{}/check-{}", tmp ? tmp : "/tmp", name);
    std::string mk = fmt::format("rm -rf '{0}' && mkdir -p '{0}'", dir_);
    ASSERT_EQ(std::system(mk.c_str()), 0) << mk;
  }

  std::string P(const std::string& name) const { return dir_ + "/" + name; }

  int ShRc(const std::string& cmd) {
    std::string full = fmt::format("cd '{}' && ( {} )", dir_, cmd);
    int st = std::system(full.c_str());
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  }
  void Sh(const std::string& cmd) { ASSERT_EQ(ShRc(cmd + " >/dev/null 2>&1"), 0) << cmd; }
  std::string Slurp(const std::string& name) {
    std::string s;
    if (FILE* f = std::fopen(P(name).c_str(), "r")) {
      char buf[4096];
      size_t n;
      while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
      std::fclose(f);
    }
    return s;
  }

  // qemu-img check [args] image, human and JSON.
  QemuCheck Qemu(const std::string& image, const std::string& args = "", bool json = false) {
    QemuCheck q;
    q.rc = ShRc(fmt::format("qemu-img check {} {} '{}' >q.out 2>q.err", args,
                            json ? "--output=json" : "", image));
    q.out = Slurp("q.out");
    q.err = Slurp("q.err");
    if (json) {
      static const std::regex kLine(R"re("([a-z-]+)": "?([^",\n]*)"?,?)re");
      for (std::sregex_iterator it(q.out.begin(), q.out.end(), kLine), end; it != end; ++it) {
        q.json.emplace_back((*it)[1], (*it)[2]);
      }
    }
    return q;
  }

  Result<Header> HeaderOf(const std::string& image) {
    auto file = SyncEnv()->Open(P(image), OpenOptions{});
    if (!file.ok()) return file.status();
    return BlockOn(ReadHeader(**file));
  }

  Result<CheckResult> Mine(const std::string& image, RepairMode mode = RepairMode::kNone) {
    auto file = SyncEnv()->Open(P(image), OpenOptions{.writable = mode != RepairMode::kNone});
    if (!file.ok()) return file.status();
    CheckOptions options;
    options.repair = mode;
    return BlockOn(CheckImage(**file, options));
  }

  static std::vector<std::pair<std::string, std::string>> JsonOf(const CheckResult& r,
                                                                 const std::string& filename) {
    std::vector<std::pair<std::string, std::string>> out;
    for (auto& [k, v] : CheckJsonFields(r, filename)) {
      if (const uint64_t* n = std::get_if<uint64_t>(&v)) {
        out.emplace_back(k, std::to_string(*n));
      } else {
        out.emplace_back(k, std::get<std::string>(v));
      }
    }
    return out;
  }

  // The stderr lines qemu-img prints for findings, sorted; ours likewise
  // (minus our extra overlap explanations).
  static std::vector<std::string> QemuFindings(const std::string& err) {
    std::vector<std::string> lines;
    size_t pos = 0;
    while (pos < err.size()) {
      size_t nl = err.find('\n', pos);
      if (nl == std::string::npos) nl = err.size();
      std::string line = err.substr(pos, nl - pos);
      pos = nl + 1;
      if (line.empty() || line.rfind("qemu-img:", 0) == 0 || line.rfind("qcow2:", 0) == 0) continue;
      lines.push_back(line);
    }
    std::sort(lines.begin(), lines.end());
    return lines;
  }
  static std::vector<std::string> MyFindings(const CheckResult& r) {
    std::vector<std::string> lines;
    for (const std::string& m : r.messages) {
      if (m.rfind("Overlap:", 0) != 0) lines.push_back(m);
    }
    std::sort(lines.begin(), lines.end());
    return lines;
  }

  // Our check of `image` reports what `qemu-img check` reports: every JSON
  // field (in qemu-img's order), the exit code, the human output and the
  // finding lines.
  void ExpectSameAsQemu(const std::string& image, bool compare_messages = true) {
    SCOPED_TRACE(image);
    QemuCheck q = Qemu(image, "", /*json=*/true);
    Result<CheckResult> r = Mine(image);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(CheckExitCode(*r), q.rc) << q.err;
    if (q.rc != 1) {
      EXPECT_EQ(JsonOf(*r, image), q.json) << q.out;
    }
    QemuCheck h = Qemu(image);
    EXPECT_EQ(FormatCheckHuman(*r, image), h.out);
    if (compare_messages) {
      EXPECT_EQ(MyFindings(*r), QemuFindings(h.err));
    }
  }

  std::string dir_;
};

// ---------------------------------------------------------------------------
// Clean images: exactly qemu-img's numbers, 0 errors.

struct CleanCase {
  std::string name;
  std::string setup;  // shell commands run in the test directory; create img.qcow2
};

std::string Create(const std::string& opts, const std::string& size) {
  return fmt::format("qemu-img create -f qcow2 {} img.qcow2 {}", opts, size);
}
std::string Io(const std::string& cmds) { return fmt::format("qemu-io {} img.qcow2", cmds); }

std::vector<CleanCase> CleanCases() {
  std::vector<CleanCase> cases;
  const std::string writes =
      "-c 'write -P 1 0 300k' -c 'write -P 2 5M 1M' -c 'write -z 8M 64k' -c 'write -P 3 31M 1M'";
  for (const char* cs : {"512", "1k", "4k", "64k", "2M"}) {
    cases.push_back({fmt::format("cluster_{}", cs),
                     Create(fmt::format("-o cluster_size={}", cs), "32M") + " && " + Io(writes)});
  }
  for (int bits : {1, 2, 4, 8, 16, 32, 64}) {
    cases.push_back({fmt::format("refcount_bits_{}", bits),
                     Create(fmt::format("-o refcount_bits={},cluster_size=4k", bits), "16M") +
                         " && " + Io("-c 'write -P 1 0 1M' -c 'write -P 2 3M 100k'")});
  }
  cases.push_back({"extended_l2_64k", Create("-o extended_l2=on", "64M") + " && " +
                                          Io("-c 'write -P 1 0 3k' -c 'write -P 2 100k 5k' -c "
                                             "'write -z 1M 64k' -c 'write -P 4 2M 128k'")});
  cases.push_back({"extended_l2_16k",
                   Create("-o extended_l2=on,cluster_size=16k", "64M") + " && " +
                       Io("-c 'write -P 1 0 3k' -c 'write -P 2 100k 5k' -c 'write -z 1M 64k'")});
  cases.push_back({"compressed_zlib", Create("-o compression_type=zlib", "16M") + " && " +
                                          Io("-c 'write -c -P 1 0 64k' -c 'write -c -P 2 64k 64k' "
                                             "-c 'write -c -P 3 1M 64k' -c 'write -P 4 2M 64k'")});
  cases.push_back(
      {"compressed_zstd_4k",
       Create("-o compression_type=zstd,cluster_size=4k", "16M") + " && " +
           Io("-c 'write -c -P 1 0 4k' -c 'write -c -P 2 4k 4k' -c 'write -c -P 3 8k 4k'")});
  cases.push_back(
      {"compressed_extended_l2", Create("-o extended_l2=on", "16M") + " && " +
                                     Io("-c 'write -c -P 1 0 64k' -c 'write -P 2 1M 4k'")});
  cases.push_back({"snapshots",
                   Create("", "16M") + " && " + Io("-c 'write -P 1 0 1M'") +
                       " && qemu-img snapshot -c s1 img.qcow2 && " + Io("-c 'write -P 2 512k 1M'") +
                       " && qemu-img snapshot -c s2 img.qcow2 && " +
                       Io("-c 'write -P 3 0 64k' -c 'write -c -P 3 4M 64k' -c 'discard 0 64k'")});
  cases.push_back({"snapshots_refcount_bits_2",
                   Create("-o refcount_bits=2,cluster_size=4k", "16M") + " && " +
                       Io("-c 'write -P 1 0 100k'") +
                       " && qemu-img snapshot -c a img.qcow2 && qemu-img snapshot -c b img.qcow2"});
  cases.push_back({"data_file", Create("-o data_file=img.raw", "16M") + " && " +
                                    Io("-c 'write -P 1 0 1M' -c 'write -z 2M 64k'")});
  cases.push_back({"data_file_raw", Create("-o data_file=img.raw,data_file_raw=on", "16M") +
                                        " && " + Io("-c 'write -P 1 0 1M'")});
  cases.push_back(
      {"backing",
       "qemu-img create -f qcow2 base.qcow2 16M && qemu-io -c 'write -P 1 0 4M' base.qcow2 && " +
           Create("-b base.qcow2 -F qcow2", "16M") + " && " +
           Io("-c 'write -P 2 1M 64k' -c 'write -z 2M 64k'")});
  cases.push_back({"v2_with_snapshot",
                   Create("-o compat=0.10", "16M") + " && " + Io("-c 'write -P 1 0 1M'") +
                       " && qemu-img snapshot -c s img.qcow2 && " + Io("-c 'write -P 2 0 64k'")});
  cases.push_back({"prealloc_metadata", Create("-o preallocation=metadata", "16M")});
  cases.push_back({"prealloc_full_4k", Create("-o preallocation=full,cluster_size=4k", "4M")});
  cases.push_back({"bitmaps", Create("", "16M") +
                                  " && qemu-img bitmap --add img.qcow2 b0 && qemu-img bitmap --add "
                                  "-g 64k img.qcow2 b1 && " +
                                  Io("-c 'write -P 1 0 1M'")});
  cases.push_back(
      {"many_refblocks_512_64bit", Create("-o cluster_size=512,refcount_bits=64", "64M") + " && " +
                                       Io("-c 'write -P 1 0 2M' -c 'write -P 2 40M 3M'")});
  cases.push_back({"sparse_2g", Create("-o cluster_size=4k", "2G") + " && " +
                                    Io("-c 'write -P 7 0 8k' -c 'write -P 7 100M 8k' -c 'write -P "
                                       "7 1G 8k' -c 'write -P 7 2000M 8k'")});
  cases.push_back({"empty", Create("", "1G")});
  cases.push_back({"lazy_refcounts_clean",
                   Create("-o lazy_refcounts=on", "16M") + " && " + Io("-c 'write -P 1 0 1M'")});
  return cases;
}

class CleanImageTest : public CheckTest, public ::testing::WithParamInterface<CleanCase> {};

TEST_P(CleanImageTest, MatchesQemuAndIsClean) {
  Sh(GetParam().setup);
  ExpectSameAsQemu("img.qcow2");
  Result<CheckResult> r = Mine("img.qcow2");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->corruptions, 0u);
  EXPECT_EQ(r->leaks, 0u);
  EXPECT_EQ(r->check_errors, 0u);
  EXPECT_TRUE(r->error.empty()) << r->error;
  EXPECT_EQ(CheckExitCode(*r), 0);
  for (const std::string& m : r->messages) ADD_FAILURE() << "unexpected message: " << m;

  // Repairing a clean image changes nothing.
  Sh("cp img.qcow2 copy.qcow2");
  Result<CheckResult> fixed = Mine("copy.qcow2", RepairMode::kAll);
  ASSERT_TRUE(fixed.ok()) << fixed.status().ToString();
  EXPECT_EQ(fixed->corruptions_fixed + fixed->leaks_fixed, 0u);
  EXPECT_EQ(ShRc("cmp -s img.qcow2 copy.qcow2"), 0);
}

INSTANTIATE_TEST_SUITE_P(Images, CleanImageTest, ::testing::ValuesIn(CleanCases()),
                         [](const auto& info) { return info.param.name; });

// ---------------------------------------------------------------------------
// Damaged images.

struct DamageCase {
  std::string name;
  std::string setup;                     // creates img.qcow2
  std::function<void(Patcher&)> damage;  // applied to img.qcow2
  // Where QEMU's -r all gives up (it cannot rebuild around some broken
  // refcount tables) and we repair: qemu-img must find our result clean.
  bool qemu_cannot_repair_all = false;
  // Our repaired file is byte for byte QEMU's.
  bool identical_after_repair = true;
  bool compare_messages = true;
};

const std::string kBase64k =
    Create("", "32M") + " && " +
    Io("-c 'write -P 1 0 300k' -c 'write -P 2 5M 1M' -c 'write -z 8M 64k' -c 'write -P 3 31M 1M'");
const std::string kBase4k =
    Create("-o cluster_size=4k", "32M") + " && " +
    Io("-c 'write -P 1 0 300k' -c 'write -P 2 5M 1M' -c 'write -z 8M 64k' -c 'write -P 3 31M 1M'");
const std::string kSnapshots = Create("", "16M") + " && " + Io("-c 'write -P 1 0 1M'") +
                               " && qemu-img snapshot -c s1 img.qcow2 && " +
                               Io("-c 'write -P 2 512k 1M'") +
                               " && qemu-img snapshot -c s2 img.qcow2 && " +
                               Io("-c 'write -P 3 0 64k' -c 'write -c -P 3 4M 64k'");
const std::string kExtended =
    Create("-o extended_l2=on", "64M") + " && " +
    Io("-c 'write -P 1 0 3k' -c 'write -P 2 100k 5k' -c 'write -z 1M 64k' -c 'write -P 4 2M 128k'");

std::vector<DamageCase> DamageCases() {
  std::vector<DamageCase> c;
  // The four the check exists for.
  c.push_back({"leaked_cluster", kBase64k, [](Patcher& p) {
                 const uint64_t l1 = p.l1_offset >> p.cluster_bits;
                 p.SetRefcountOf(l1, p.Refcount(l1) + 1);
               }});
  c.push_back({"refcount_zero_for_used_data", kBase64k,
               [](Patcher& p) { p.SetRefcountOf(p.HostCluster(5 << 20), 0); }});
  c.push_back({"copied_flag_cleared", kBase64k,
               [](Patcher& p) { p.SetL2Entry(0, p.L2Entry(0) & ~kEntryCopied); }});
  c.push_back({"l2_entry_points_into_l1_table", kBase64k,
               [](Patcher& p) { p.SetL2Entry(5 << 20, kEntryCopied | p.l1_offset); }});
  // More refcount damage.
  c.push_back({"refcount_too_low_shared_by_snapshots", kSnapshots,
               [](Patcher& p) { p.SetRefcountOf(p.HostCluster(64 << 10), 1); }});
  c.push_back({"refcount_too_high_extended_l2", kExtended, [](Patcher& p) {
                 const uint64_t c = p.HostCluster(2 << 20);
                 p.SetRefcountOf(c, 3);
               }});
  c.push_back({"missing_refblock_rebuild",
               Create("-o cluster_size=512,refcount_bits=64", "64M") + " && " +
                   Io("-c 'write -P 1 0 2M' -c 'write -P 2 40M 3M'"),
               [](Patcher& p) { p.SetU64(p.refcount_table_offset + 3 * 8, 0); }});
  c.push_back({"first_refblock_missing_rebuild",
               Create("-o refcount_bits=64,cluster_size=4k", "16M") + " && " +
                   Io("-c 'write -P 1 0 1M' -c 'write -P 2 3M 100k'"),
               [](Patcher& p) { p.SetU64(p.refcount_table_offset, 0); }});
  c.push_back({"refblock_outside_image", kBase4k,
               [](Patcher& p) { p.SetU64(p.refcount_table_offset + 5 * 8, 64 << 20); }});
  c.push_back(
      {"refblock_unaligned", kBase4k,
       [](Patcher& p) { p.SetU64(p.refcount_table_offset, p.U64(p.refcount_table_offset) + 512); },
       /*qemu_cannot_repair_all=*/true,
       /*identical_after_repair=*/false});
  c.push_back(
      {"reftable_reserved_bits", kBase4k,
       [](Patcher& p) { p.SetU64(p.refcount_table_offset, p.U64(p.refcount_table_offset) | 1); },
       /*qemu_cannot_repair_all=*/true, /*identical_after_repair=*/false});
  c.push_back({"data_cluster_is_a_refblock", kBase4k, [](Patcher& p) {
                 p.SetL2Entry(40 << 10, kEntryCopied | (p.U64(p.refcount_table_offset) & ~511ull));
               }});
  c.push_back({"two_l2_entries_share_a_cluster", kBase64k,
               [](Patcher& p) { p.SetL2Entry(64 << 10, p.L2Entry(0)); }});
  c.push_back(
      {"refcount_overflow_1bit",
       Create("-o refcount_bits=1,cluster_size=4k", "16M") + " && " + Io("-c 'write -P 1 0 1M'"),
       [](Patcher& p) { p.SetL2Entry(4 << 10, p.L2Entry(0)); }});
  // COPIED flags.
  c.push_back({"l1_copied_flag_cleared", kBase64k,
               [](Patcher& p) { p.SetU64(p.l1_offset, p.U64(p.l1_offset) & ~kEntryCopied); }});
  c.push_back({"copied_flag_on_shared_cluster", kSnapshots,
               [](Patcher& p) { p.SetL2Entry(640 << 10, p.L2Entry(640 << 10) | kEntryCopied); }});
  c.push_back({"copied_flag_on_compressed", kSnapshots,
               [](Patcher& p) { p.SetL2Entry(4 << 20, p.L2Entry(4 << 20) | kEntryCopied); }});
  // Entries the spec forbids.
  c.push_back({"l1_reserved_bits", kBase64k,
               [](Patcher& p) { p.SetU64(p.l1_offset, p.U64(p.l1_offset) | 2); }});
  c.push_back({"l2_reserved_bits", kBase64k,
               [](Patcher& p) { p.SetL2Entry(0, p.L2Entry(0) | (1ull << 56)); }});
  c.push_back({"l2_table_unaligned", kBase4k,
               [](Patcher& p) { p.SetU64(p.l1_offset, p.U64(p.l1_offset) + 512); }});
  c.push_back({"data_cluster_unaligned", kBase4k,
               [](Patcher& p) { p.SetL2Entry(12 << 10, p.L2Entry(12 << 10) + 1024); }});
  c.push_back(
      {"prealloc_zero_unaligned", Create("-o preallocation=metadata", "16M"),
       [](Patcher& p) { p.SetL2Entry(3 << 16, (p.L2Entry(3 << 16) + 1024) | kEntryZero); }});
  c.push_back({"prealloc_zero_unaligned_extended_l2", kExtended,
               [](Patcher& p) { p.SetL2Entry(1 << 20, p.L2Entry(1 << 20) + 1024); }});
  c.push_back({"data_past_end_of_file", kBase64k,
               [](Patcher& p) { p.SetL2Entry(5 << 20, kEntryCopied | (1ull << 40)); }});
  c.push_back({"extended_l2_alloc_and_zero_bits", kExtended, [](Patcher& p) {
                 const uint64_t a = p.L2EntryAddress(0);
                 p.SetU64(a + 8, p.U64(a + 8) | (1ull << 32));
               }});
  c.push_back({"extended_l2_unallocated_with_alloc_bits", kExtended,
               [](Patcher& p) { p.SetU64(p.L2EntryAddress(500 << 16) + 8, 3); }});
  c.push_back({"compressed_with_subcluster_bitmap",
               Create("-o extended_l2=on", "16M") + " && " +
                   Io("-c 'write -c -P 1 0 64k' -c 'write -P 2 1M 4k'"),
               [](Patcher& p) { p.SetU64(p.L2EntryAddress(0) + 8, 1); }});
  c.push_back({"compressed_entry_with_data_file",
               Create("-o data_file=img.raw", "16M") + " && " + Io("-c 'write -P 1 0 1M'"),
               [](Patcher& p) { p.SetL2Entry(100 << 16, kEntryCompressed | 0x50000); }});
  c.push_back({"snapshot_l1_unaligned", kSnapshots,
               [](Patcher& p) { p.SetU64(p.snapshots_offset, p.U64(p.snapshots_offset) + 512); }});
  // Header bits and extensions.
  c.push_back({"corrupt_bit_and_leak", kBase64k, [](Patcher& p) {
                 p.SetU64(72, p.incompatible | kIncompatCorrupt);
                 const uint64_t l1 = p.l1_offset >> p.cluster_bits;
                 p.SetRefcountOf(l1, p.Refcount(l1) + 1);
               }});
  c.push_back({"bitmaps_autoclear_cleared",
               Create("", "16M") + " && qemu-img bitmap --add img.qcow2 b0 && " +
                   Io("-c 'write -P 1 0 1M'"),
               [](Patcher& p) { p.SetU64(88, 0); },
               // QEMU also drops the stale bitmaps extension from the header.
               false, /*identical_after_repair=*/false, /*compare_messages=*/false});
  return c;
}

class DamagedImageTest : public CheckTest, public ::testing::WithParamInterface<DamageCase> {};

TEST_P(DamagedImageTest, MatchesQemuAndRepairs) {
  const DamageCase& c = GetParam();
  Sh(c.setup);
  {
    Patcher p(P("img.qcow2"));
    c.damage(p);
  }
  ExpectSameAsQemu("img.qcow2", c.compare_messages);
  {
    Result<CheckResult> r = Mine("img.qcow2");
    ASSERT_TRUE(r.ok());
    EXPECT_NE(CheckExitCode(*r), 0) << "the damage went unnoticed";
  }

  for (RepairMode mode : {RepairMode::kLeaks, RepairMode::kAll}) {
    const char* flag = mode == RepairMode::kAll ? "all" : "leaks";
    SCOPED_TRACE(fmt::format("-r {}", flag));
    Sh("cp img.qcow2 mine.qcow2 && cp img.qcow2 qemu.qcow2 && cp img.qcow2 qemu_human.qcow2");
    QemuCheck q = Qemu("qemu.qcow2", fmt::format("-r {}", flag), /*json=*/true);
    QemuCheck q_human = Qemu("qemu_human.qcow2", fmt::format("-r {}", flag));
    Result<CheckResult> r = Mine("mine.qcow2", mode);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    const bool qemu_failed = mode == RepairMode::kAll && c.qemu_cannot_repair_all;
    if (!qemu_failed) {
      // The same repair counts, exit code and report as qemu-img's.
      EXPECT_EQ(CheckExitCode(*r), q.rc) << q.err;
      if (q.rc != 1) {
        EXPECT_EQ(JsonOf(*r, "qemu.qcow2"), q.json) << q.out;
        EXPECT_EQ(FormatCheckHuman(*r, "mine.qcow2"), q_human.out);
      }
    }
    // qemu-img's verdict on our repaired image equals its verdict on its own.
    QemuCheck after_mine = Qemu("mine.qcow2", "", /*json=*/true);
    if (qemu_failed) {
      EXPECT_EQ(CheckExitCode(*r), 0) << r->error;
      EXPECT_EQ(after_mine.rc, 0) << after_mine.err;
      continue;
    }
    QemuCheck after_qemu = Qemu("qemu.qcow2", "", /*json=*/true);
    EXPECT_EQ(after_mine.rc, after_qemu.rc) << after_mine.err;
    auto without_filename = [](std::vector<std::pair<std::string, std::string>> j) {
      std::erase_if(j, [](const auto& kv) { return kv.first == "filename"; });
      return j;
    };
    EXPECT_EQ(without_filename(after_mine.json), without_filename(after_qemu.json));
    if (c.identical_after_repair) {
      EXPECT_EQ(ShRc("cmp mine.qcow2 qemu.qcow2 >/dev/null"), 0) << "not byte-identical to QEMU's";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Images, DamagedImageTest, ::testing::ValuesIn(DamageCases()),
                         [](const auto& info) { return info.param.name; });

// ---------------------------------------------------------------------------
// Cases that need more than a byte patch.

// A crash with lazy refcounts leaves the image dirty with refcounts missing.
TEST_F(CheckTest, DirtyLazyRefcountsAfterCrash) {
  Sh(Create("-o lazy_refcounts=on", "16M"));
  // qemu-io dies by SIGKILL, so its exit status is not 0.
  ShRc(Io("-c 'write -P 1 0 1M' -c 'write -P 2 4M 64k' -c 'sigraise 9'") + " >/dev/null 2>&1");
  ASSERT_TRUE(Patcher(P("img.qcow2")).incompatible & kIncompatDirty);
  ExpectSameAsQemu("img.qcow2");

  Sh("cp img.qcow2 mine.qcow2 && cp img.qcow2 qemu.qcow2");
  QemuCheck q = Qemu("qemu.qcow2", "-r all", /*json=*/true);
  Result<CheckResult> r = Mine("mine.qcow2", RepairMode::kAll);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(CheckExitCode(*r), q.rc);
  EXPECT_EQ(JsonOf(*r, "qemu.qcow2"), q.json);
  EXPECT_EQ(Qemu("mine.qcow2").rc, 0);
  EXPECT_FALSE(Patcher(P("mine.qcow2")).incompatible & kIncompatDirty);
  EXPECT_EQ(ShRc("cmp mine.qcow2 qemu.qcow2 >/dev/null"), 0);

  // Leaks alone cannot fix missing refcounts. qemu-img fails the same way
  // but clears the dirty bit anyway (when it closes the image); we keep it,
  // as the refcounts are still wrong.
  Sh("cp img.qcow2 mine.qcow2 && cp img.qcow2 qemu.qcow2");
  q = Qemu("qemu.qcow2", "-r leaks");
  r = Mine("mine.qcow2", RepairMode::kLeaks);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(q.rc, 1);
  EXPECT_EQ(CheckExitCode(*r), 1);
  EXPECT_FALSE(r->error.empty());
  EXPECT_TRUE(Patcher(P("mine.qcow2")).incompatible & kIncompatDirty);
}

// v3 snapshot table entries need 16 bytes of extra data; -r all rewrites the
// table like QEMU.
TEST_F(CheckTest, IncompleteSnapshotExtraData) {
  Sh(Create("", "16M") + " && " + Io("-c 'write -P 1 0 1M'") +
     " && qemu-img snapshot -c one img.qcow2 && " + Io("-c 'write -P 2 0 64k'") +
     " && qemu-img snapshot -c two img.qcow2");
  {
    auto file = SyncEnv()->Open(P("img.qcow2"), OpenOptions{.writable = true});
    ASSERT_TRUE(file.ok());
    Patcher p(P("img.qcow2"));
    auto snapshots = BlockOn(ReadSnapshotTable(**file, p.snapshots_offset, 2, *(*file)->Size(), 3));
    ASSERT_TRUE(snapshots.ok()) << snapshots.status().ToString();
    (*snapshots)[0].extra_data.clear();  // no extra data at all
    (*snapshots)[0].disk_size.reset();
    (*snapshots)[0].icount.reset();
    (*snapshots)[1].extra_data.resize(8);  // vm_state_size only
    (*snapshots)[1].disk_size.reset();
    (*snapshots)[1].icount.reset();
    std::vector<std::byte> table = SerializeSnapshotTable(*snapshots);
    table.resize(table.size() + 64);  // the old table was longer
    p.Write(p.snapshots_offset, table);
  }
  ExpectSameAsQemu("img.qcow2");
  Result<CheckResult> before = Mine("img.qcow2");
  ASSERT_TRUE(before.ok());
  EXPECT_EQ(before->corruptions, 2u);

  Sh("cp img.qcow2 mine.qcow2 && cp img.qcow2 qemu.qcow2");
  QemuCheck q = Qemu("qemu.qcow2", "-r all", /*json=*/true);
  Result<CheckResult> r = Mine("mine.qcow2", RepairMode::kAll);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(CheckExitCode(*r), 0);
  EXPECT_EQ(r->corruptions_fixed, 2u);
  EXPECT_EQ(JsonOf(*r, "qemu.qcow2"), q.json);
  EXPECT_EQ(Qemu("mine.qcow2").rc, 0);
  EXPECT_EQ(ShRc("cmp mine.qcow2 qemu.qcow2 >/dev/null"), 0);
  EXPECT_EQ(ShRc("qemu-img snapshot -l mine.qcow2 | grep -c 'one\\|two' | grep -qx 2"), 0);
}

// ---------------------------------------------------------------------------
// Snapshot tables that QEMU's check reads in its own way (qcow2_check_read_
// snapshot_table): extra data over 1024 bytes is cut by -r all, bytes past
// the end of the file read as zeros, entries past 64 MiB are dropped.

class SnapshotTableCheckTest : public CheckTest {
 protected:
  // img.qcow2: 16 MiB, data, one snapshot "s1" (its table is the file's last
  // cluster, so fields that grow run past the end of the file).
  void MakeImage() {
    Sh(Create("", "16M") + " && " + Io("-c 'write -P 1 0 128k'") +
       " && qemu-img snapshot -c s1 img.qcow2");
  }

  // Rewrites entry 0 with `extra_size` bytes of extra data (the stored bytes,
  // then 0x5a filler), id and name; then cuts the file `keep` bytes after the
  // table's start, if given.
  void RewriteEntry(uint32_t extra_size, const std::string& id, const std::string& name,
                    std::optional<uint64_t> keep = std::nullopt) {
    Patcher p(P("img.qcow2"));
    std::vector<std::byte> fixed = p.Read(p.snapshots_offset, 40);
    std::vector<std::byte> extra = p.Read(p.snapshots_offset + 40, LoadBE32(fixed, 36));
    extra.resize(extra_size, std::byte{0x5a});
    StoreBE16(fixed, 12, static_cast<uint16_t>(id.size()));
    StoreBE16(fixed, 14, static_cast<uint16_t>(name.size()));
    StoreBE32(fixed, 36, extra_size);
    std::vector<std::byte> entry = fixed;
    entry.insert(entry.end(), extra.begin(), extra.end());
    for (char c : id + name) entry.push_back(static_cast<std::byte>(c));
    p.Write(p.snapshots_offset, entry);
    if (keep) {
      ASSERT_EQ(::truncate(P("img.qcow2").c_str(), static_cast<off_t>(p.snapshots_offset + *keep)),
                0);
    }
  }
  void SetSnapshotCount(uint32_t n) {
    Patcher p(P("img.qcow2"));
    std::byte b[4];
    StoreBE32(b, 0, n);
    p.Write(60, b);
  }

  // qemu-img's stderr lines as we print them: without its "qemu-img: "
  // prefix, without "Check failed" (ours goes in CheckResult::error).
  static std::vector<std::string> QemuLines(const std::string& err) {
    std::vector<std::string> lines;
    std::istringstream in(err);
    for (std::string line; std::getline(in, line);) {
      if (line.rfind("qemu-img: ", 0) == 0) line = line.substr(10);
      if (line.empty() || line.rfind("Check failed: ", 0) == 0) continue;
      lines.push_back(line);
    }
    return lines;
  }
  static std::vector<std::string> MyLines(const CheckResult& r) {
    std::vector<std::string> lines;
    for (const std::string& m : r.messages) {
      if (m.rfind("Overlap:", 0) != 0) lines.push_back(m);
    }
    return lines;
  }
  static std::string QemuFailure(const std::string& err) {
    size_t at = err.find("Check failed: ");
    if (at == std::string::npos) return "";
    return err.substr(at + 14, err.find('\n', at) - at - 14);
  }

  // Our check of img.qcow2 against qemu-img's: exit code, every stderr line
  // in order, the failure, and JSON when the check did not fail; then -r all
  // on twin copies: the same again (the lines only if `same_repair_lines`)
  // and, when `same_state`, qemu-img finds both images alike (check output,
  // snapshot list).
  void ExpectSameAsQemuWithRepair(bool same_state = true, bool same_repair_lines = true) {
    for (bool repair : {false, true}) {
      SCOPED_TRACE(repair ? "-r all" : "no repair");
      std::string image = "img.qcow2";
      if (repair) {
        Sh("cp img.qcow2 mine.qcow2 && cp img.qcow2 qemu.qcow2");
        image = "qemu.qcow2";
      }
      QemuCheck q = Qemu(image, repair ? "-r all" : "", /*json=*/true);
      Result<CheckResult> r =
          Mine(repair ? "mine.qcow2" : image, repair ? RepairMode::kAll : RepairMode::kNone);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      EXPECT_EQ(CheckExitCode(*r), q.rc) << q.err;
      if (!repair || same_repair_lines) {
        EXPECT_EQ(MyLines(*r), QemuLines(q.err));
        EXPECT_EQ(r->error, QemuFailure(q.err));
      }
      if (q.rc != 1) EXPECT_EQ(JsonOf(*r, image), q.json) << q.out;
    }
    if (!same_state) return;
    QemuCheck mine = Qemu("mine.qcow2"), qemu = Qemu("qemu.qcow2");
    EXPECT_EQ(mine.rc, qemu.rc);
    EXPECT_EQ(mine.out, qemu.out);
    EXPECT_EQ(mine.err, qemu.err);
    EXPECT_EQ(ShRc("qemu-img snapshot -l mine.qcow2 >mine.list 2>&1"),
              ShRc("qemu-img snapshot -l qemu.qcow2 >qemu.list 2>&1"));
    EXPECT_EQ(Slurp("mine.list"), Slurp("qemu.list"));
  }
};

TEST_F(SnapshotTableCheckTest, ExtraDataAtTheLimitIsClean) {
  MakeImage();
  RewriteEntry(1024, "1", "s1");
  ExpectSameAsQemuWithRepair();
  EXPECT_EQ(CheckExitCode(*Mine("img.qcow2")), 0);
}

TEST_F(SnapshotTableCheckTest, ExtraDataOverTheLimitIsCutByRepairAll) {
  for (uint32_t size : {1025u, 2000u, 60000u}) {
    SCOPED_TRACE(size);
    MakeImage();
    RewriteEntry(size, "1", "s1");
    ExpectSameAsQemuWithRepair();
    Result<CheckResult> r = Mine("mine.qcow2");
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(CheckExitCode(*r), 0);
    // The first 1024 bytes of extra data survive, filler included.
    auto file = SyncEnv()->Open(P("mine.qcow2"), OpenOptions{});
    ASSERT_TRUE(file.ok());
    Patcher p(P("mine.qcow2"));
    auto table = BlockOn(ReadSnapshotTable(**file, p.snapshots_offset, 1, *(*file)->Size(), 3));
    ASSERT_TRUE(table.ok()) << table.status().ToString();
    ASSERT_EQ((*table)[0].extra_data.size(), 1024u);
    EXPECT_EQ((*table)[0].extra_data[1023], std::byte{0x5a});
    EXPECT_EQ((*table)[0].name, "s1");
  }
}

TEST_F(SnapshotTableCheckTest, FieldsPastTheEndOfTheFileReadAsZeros) {
  struct Case {
    const char* what;
    uint32_t extra;
    std::string id, name;
    uint64_t keep;
  };
  const std::vector<Case> cases = {
      {"name", 24, "1", std::string(200, 'n'), 40 + 24 + 1 + 10},
      {"id", 24, std::string(300, '1'), "s1", 40 + 24 + 5},
      {"extra data", 1000, "1", "s1", 40 + 100},
      {"fixed part", 24, "1", "s1", 20},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    MakeImage();
    RewriteEntry(c.extra, c.id, c.name, c.keep);
    ExpectSameAsQemuWithRepair();
  }
}

// The table reaches more than a cluster past the end of the file: QEMU
// reports it; its own repair goes wrong, so only the exit code is compared.
TEST_F(SnapshotTableCheckTest, TablePastTheEndOfTheFileByClusters) {
  MakeImage();
  RewriteEntry(1000, std::string(65535, '1'), std::string(65535, 'n'), 40 + 100);
  ExpectSameAsQemuWithRepair(/*same_state=*/false);
}

TEST_F(SnapshotTableCheckTest, CountLargerThanTheTable) {
  for (uint32_t n : {2u, 100u}) {
    SCOPED_TRACE(n);
    MakeImage();
    SetSnapshotCount(n);
    ExpectSameAsQemuWithRepair();
  }
}

TEST_F(SnapshotTableCheckTest, CountOverTheLimit) {
  MakeImage();
  SetSnapshotCount(70000);
  // With -r all, QEMU drops 4464 entries, then the 65536 left (zeros past
  // the end of the file) overrun the file and its table rewrite fails on an
  // overlap; ours is refused for the inconsistent refcounts: both exit 1.
  ExpectSameAsQemuWithRepair(/*same_state=*/false, /*same_repair_lines=*/false);
}

// LUKS: the check needs no key (qemu-img needs it only to open the image).
TEST_F(CheckTest, EncryptedImage) {
  const std::string secret = "--object secret,id=sec0,data=abc";
  // QEMU's PBKDF2 timing probe needs the preloaded clock (QemuImgForLuks); retried without it.
  const std::string create = fmt::format(
      "{} create -f qcow2 {} -o "
      "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=4k "
      "img.qcow2 16M >/dev/null 2>&1",
      testing::QemuImgForLuks(), secret);
  int rc = 1;
  for (int attempt = 0; attempt < 20 && rc != 0; ++attempt) rc = ShRc(create);
  ASSERT_EQ(rc, 0) << create;
  Sh(fmt::format(
      "qemu-io {} --image-opts driver=qcow2,file.filename=img.qcow2,encrypt.key-secret=sec0 -c "
      "'write -P 1 0 100k'",
      secret));
  auto qemu = [&](const std::string& image, const std::string& args) {
    return Qemu(fmt::format("driver=qcow2,file.filename={},encrypt.key-secret=sec0", image),
                fmt::format("{} --image-opts {}", secret, args), /*json=*/true);
  };
  auto json = [](const QemuCheck& q) {
    auto j = q.json;
    std::erase_if(j, [](const auto& kv) { return kv.first == "filename"; });
    return j;
  };
  auto mine_json = [](const CheckResult& r) {
    auto j = JsonOf(r, "");
    std::erase_if(j, [](const auto& kv) { return kv.first == "filename"; });
    return j;
  };
  QemuCheck q = qemu("img.qcow2", "");
  Result<CheckResult> r = Mine("img.qcow2");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(q.rc, 0) << q.err;
  EXPECT_EQ(CheckExitCode(*r), 0);
  EXPECT_EQ(mine_json(*r), json(q));

  // A leaked cluster in the LUKS header area's neighbourhood.
  {
    Patcher p(P("img.qcow2"));
    p.SetRefcountOf(2, p.Refcount(2) + 4);
  }
  q = qemu("img.qcow2", "");
  r = Mine("img.qcow2");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(q.rc, 3);
  EXPECT_EQ(CheckExitCode(*r), 3);
  EXPECT_EQ(mine_json(*r), json(q));
  r = Mine("img.qcow2", RepairMode::kLeaks);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->leaks_fixed, 1u);
  EXPECT_EQ(qemu("img.qcow2", "").rc, 0);
}

// A broken bitmap directory: qemu-img cannot even open the image; we report
// a failed check (exit code 1 either way).
TEST_F(CheckTest, BrokenBitmapDirectory) {
  Sh(Create("", "16M") + " && qemu-img bitmap --add img.qcow2 b0");
  {
    Patcher p(P("img.qcow2"));
    Result<Header> h = HeaderOf("img.qcow2");
    ASSERT_TRUE(h.ok() && h->bitmaps);
    std::byte bad_type[1] = {std::byte{7}};
    p.Write(h->bitmaps->directory_offset + 16, bad_type);
  }
  EXPECT_EQ(Qemu("img.qcow2").rc, 1);
  Result<CheckResult> r = Mine("img.qcow2");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(CheckExitCode(*r), 1);
  EXPECT_NE(r->error.find("doesn't satisfy the constraints"), std::string::npos) << r->error;
  EXPECT_EQ(FormatCheckHuman(*r, "img.qcow2"), "");
}

// A bitmap in use whose table is too small for the disk (a resize that
// crashed after marking it, before storing it): QEMU's check accepts it, as
// it is inconsistent anyway; so do we.
TEST_F(CheckTest, BitmapInUseWithATableTooSmallForTheDisk) {
  Sh(Create("-o cluster_size=512", "1M") +
     " && qemu-img bitmap --add -g 512 img.qcow2 b0 && qemu-img resize img.qcow2 5M");
  {
    Patcher p(P("img.qcow2"));
    Result<Header> h = HeaderOf("img.qcow2");
    ASSERT_TRUE(h.ok() && h->bitmaps);
    // table_size 1 (512 bytes: 2 MiB of disk at 512 B a bit), flags in use | auto.
    std::byte entry[8] = {std::byte{0}, std::byte{0}, std::byte{0}, std::byte{1},
                          std::byte{0}, std::byte{0}, std::byte{0}, std::byte{3}};
    p.Write(h->bitmaps->directory_offset + 8, entry);
  }
  QemuCheck q = Qemu("img.qcow2");
  Result<CheckResult> r = Mine("img.qcow2");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(q.rc, 0) << q.out << q.err;
  EXPECT_EQ(CheckExitCode(*r), q.rc) << r->error;
  EXPECT_TRUE(r->error.empty()) << r->error;
}

// Bitmap tables as QEMU's check reads them: every table, in use or not, with
// QEMU's rules. b0 is in use (inconsistent, so QEMU's open never reads its
// table) if `in_use`, its table entry 0 is `entry` if given; with
// `table_past_eof`, b0's table lies past the end of the file (reads as zeros;
// its cluster counts as a reference beyond the end).
class BitmapTableCheckTest : public CheckTest {
 protected:
  void MakeImage(std::optional<uint64_t> entry, bool in_use, bool table_past_eof = false) {
    Sh(Create("", "4M") + " && " + Io("-c 'write -P 1 0 256k'") +
       " && qemu-img bitmap --add img.qcow2 b0 && " + Io("-c 'write -P 2 1M 64k'") +
       " && qemu-img bitmap --add img.qcow2 b1");
    Patcher p(P("img.qcow2"));
    Result<Header> h = HeaderOf("img.qcow2");
    ASSERT_TRUE(h.ok() && h->bitmaps);
    const uint64_t dir = h->bitmaps->directory_offset;
    if (entry) p.SetU64(p.U64(dir), *entry);
    if (in_use) {
      std::byte flags[4];
      StoreBE32(flags, 0, 3);  // in_use | auto
      p.Write(dir + 12, flags);
    }
    if (table_past_eof) p.SetU64(dir, 100 << 20);
  }

  // Exit code, every stderr line and the failure, as qemu-img check's.
  void ExpectSameAsQemu() {
    QemuCheck q = Qemu("img.qcow2");
    Result<CheckResult> r = Mine("img.qcow2");
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(CheckExitCode(*r), q.rc) << q.err;
    std::string mine;
    for (const std::string& m : r->messages) mine += m + "\n";
    if (!r->error.empty()) mine += "Check failed: " + r->error + "\n";
    std::string theirs;
    std::istringstream in(q.err);
    for (std::string line; std::getline(in, line);) {
      theirs += (line.rfind("qemu-img: ", 0) == 0 ? line.substr(10) : line) + "\n";
    }
    EXPECT_EQ(mine, theirs);
  }
};

// QEMU's check fails the whole check with -EINVAL on a bad entry in any table.
TEST_F(BitmapTableCheckTest, BadEntryInABitmapInUseFailsTheCheckAsQemu) {
  for (uint64_t bad : {uint64_t{0x2}, uint64_t{0x10000 + 512}, uint64_t{0x10000 | 1}}) {
    SCOPED_TRACE(bad);
    MakeImage(bad, /*in_use=*/true);
    ExpectSameAsQemu();
    Result<CheckResult> r = Mine("img.qcow2");
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->error, "Invalid argument");
  }
}

TEST_F(BitmapTableCheckTest, ValidEntriesInABitmapInUseAreCounted) {
  MakeImage(std::nullopt, /*in_use=*/true);
  ExpectSameAsQemu();
  EXPECT_EQ(Qemu("img.qcow2").rc, 0);
}

// The engine's open refuses a table outside the file; the check counts it, as QEMU's.
TEST_F(BitmapTableCheckTest, TablePastTheEndOfTheFileIsAReferenceNotAFailure) {
  MakeImage(std::nullopt, /*in_use=*/false, /*table_past_eof=*/true);
  ExpectSameAsQemu();
  EXPECT_EQ(Qemu("img.qcow2").rc, 2);
}

// The same check and repair through an Env whose operations complete later
// and in random order.
TEST_F(CheckTest, DeferredCompletionEnv) {
  Sh(kBase4k);
  {
    Patcher p(P("img.qcow2"));
    p.SetRefcountOf(p.HostCluster(5 << 20), 0);         // corruption
    p.SetRefcountOf(p.l1_offset >> p.cluster_bits, 2);  // leak
    p.SetU64(p.refcount_table_offset + 8, 0);           // missing refblock: rebuild
  }
  Result<CheckResult> sync = Mine("img.qcow2");
  ASSERT_TRUE(sync.ok());
  for (uint64_t seed : {1, 2, 3}) {
    testing::MemEnv env(testing::MemEnvOptions{
        .completion = testing::MemEnvOptions::Completion::kDeferred, .seed = seed});
    ASSERT_TRUE(env.ImportFromHostFile(P("img.qcow2"), "img").ok());
    auto file = env.Open("img", OpenOptions{.writable = true});
    ASSERT_TRUE(file.ok());
    Result<CheckResult> check = BlockOn(CheckImage(**file, CheckOptions{}), &env);
    ASSERT_TRUE(check.ok());
    EXPECT_EQ(JsonOf(*check, ""), JsonOf(*sync, ""));
    EXPECT_EQ(check->messages, sync->messages);

    CheckOptions all;
    all.repair = RepairMode::kAll;
    Result<CheckResult> fixed = BlockOn(CheckImage(**file, all), &env);
    ASSERT_TRUE(fixed.ok());
    EXPECT_EQ(CheckExitCode(*fixed), 0) << fixed->error;
    EXPECT_GT(fixed->corruptions_fixed, 0u);
    const std::string out = P(fmt::format("deferred-{}.qcow2", seed));
    ASSERT_TRUE(env.ExportToHostFile("img", out).ok());
    EXPECT_EQ(Qemu(out).rc, 0);
  }
}

TEST_F(CheckTest, NotQcow2) {
  Sh("head -c 1048576 /dev/zero > raw.img");
  Result<CheckResult> r = Mine("raw.img");
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsInvalidArgument()) << r.status().ToString();
}

TEST_F(CheckTest, RefusesImagesBeyondTheMemoryLimit) {
  Sh(Create("-o cluster_size=512,refcount_bits=64", "64M") + " && " + Io("-c 'write -P 1 0 4M'"));
  auto file = SyncEnv()->Open(P("img.qcow2"), OpenOptions{});
  ASSERT_TRUE(file.ok());
  CheckOptions options;
  options.max_memory_bytes = 4096;  // 64 refcounts of 64 bits: far too few
  Result<CheckResult> r = BlockOn(CheckImage(**file, options));
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsInvalidArgument()) << r.status().ToString();
  EXPECT_NE(r.status().message().find("too large to check"), std::string::npos);
}

TEST_F(CheckTest, RepairThroughReadOnlyFileFails) {
  Sh(kBase64k);
  {
    Patcher p(P("img.qcow2"));
    p.SetRefcountOf(p.l1_offset >> p.cluster_bits, 2);
  }
  auto file = SyncEnv()->Open(P("img.qcow2"), OpenOptions{});  // read-only
  ASSERT_TRUE(file.ok());
  CheckOptions options;
  options.repair = RepairMode::kLeaks;
  Result<CheckResult> r = BlockOn(CheckImage(**file, options));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(CheckExitCode(*r), 1);
  EXPECT_GT(r->check_errors, 0u);
  EXPECT_EQ(Qemu("img.qcow2").rc, 3);  // nothing was changed
}

TEST_F(CheckTest, MessagesAreCappedCountersAreNot) {
  Sh(Create("-o cluster_size=512,refcount_bits=64", "64M") + " && " + Io("-c 'write -P 1 0 2M'"));
  {
    Patcher p(P("img.qcow2"));
    p.SetU64(p.refcount_table_offset + 8,
             0);  // 64 clusters lose their refcounts
  }
  auto file = SyncEnv()->Open(P("img.qcow2"), OpenOptions{});
  CheckOptions options;
  options.max_messages = 10;
  Result<CheckResult> r = BlockOn(CheckImage(**file, options));
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(r->messages.size(), 11u);
  EXPECT_NE(r->messages.back().find("more messages not shown"), std::string::npos);
  Result<CheckResult> full = Mine("img.qcow2");
  ASSERT_TRUE(full.ok());
  EXPECT_GT(full->messages.size(), 11u);
  EXPECT_EQ(JsonOf(*r, ""), JsonOf(*full, ""));
}

TEST(CheckFormatTest, ExitCodes) {
  CheckResult r;
  EXPECT_EQ(CheckExitCode(r), 0);
  r.leaks = 1;
  EXPECT_EQ(CheckExitCode(r), 3);
  r.corruptions = 1;
  EXPECT_EQ(CheckExitCode(r), 2);
  r.check_errors = 1;
  EXPECT_EQ(CheckExitCode(r), 1);
  r = CheckResult{};
  r.error = "Input/output error";
  EXPECT_EQ(CheckExitCode(r), 1);
  r = CheckResult{};
  r.leaks_fixed = 5;
  r.corruptions_fixed = 2;
  EXPECT_EQ(CheckExitCode(r), 0);
}

TEST(CheckFormatTest, JsonFieldsOmitZeros) {
  CheckResult r;
  auto fields = CheckJsonFields(r, "x.qcow2");
  ASSERT_EQ(fields.size(), 3u);
  EXPECT_EQ(fields[0].first, "check-errors");
  EXPECT_EQ(std::get<uint64_t>(fields[0].second), 0u);
  EXPECT_EQ(fields[1].first, "filename");
  EXPECT_EQ(std::get<std::string>(fields[1].second), "x.qcow2");
  EXPECT_EQ(fields[2].first, "format");
  EXPECT_EQ(std::get<std::string>(fields[2].second), "qcow2");
  r.image_end_offset = 1;
  r.compressed_clusters = 2;
  r.total_clusters = 3;
  r.corruptions = 4;
  r.corruptions_fixed = 5;
  r.check_errors = 6;
  r.leaks = 7;
  r.leaks_fixed = 8;
  r.allocated_clusters = 9;
  r.fragmented_clusters = 10;
  std::vector<std::string> keys;
  for (auto& [k, v] : CheckJsonFields(r, "x")) keys.push_back(k);
  EXPECT_EQ(keys, (std::vector<std::string>{
                      "image-end-offset", "compressed-clusters", "total-clusters", "corruptions",
                      "corruptions-fixed", "check-errors", "leaks", "leaks-fixed",
                      "allocated-clusters", "filename", "format", "fragmented-clusters"}));
}

TEST(CheckFormatTest, HumanReportWithInternalErrors) {
  CheckResult r;
  r.check_errors = 2;
  r.total_clusters = 4;
  r.allocated_clusters = 2;
  r.fragmented_clusters = 1;
  EXPECT_EQ(FormatCheckHuman(r, "x"),
            "\n2 internal errors have occurred during the check.\n"
            "2/4 = 50.00% allocated, 50.00% fragmented, 0.00% compressed clusters\n");
}

}  // namespace
}  // namespace uq::qcow2
