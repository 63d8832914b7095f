// Crash safety of Qcow2Image::Amend's version changes by fault injection, as
// resize_crash_test.cc does for Resize. A QEMU-made image (zero clusters,
// plain and preallocated; backing files and internal snapshots in some
// cases) is opened in a FaultInjectionEnv and amended to the other version,
// then closed. The run is replayed with a crash at every write and sync
// boundary (each of the three CrashModes in turn), and the surviving image
// must
//   - pass `qemu-img check` with no corruption (leaks are allowed), and
//   - have the old or the new version, never another, and
//   - read as before, in the active view and in every snapshot, and
//   - at version 3 list the persistent bitmaps it had, at version 2 have no
//     bitmaps extension (a downgrade drops them).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "qcow2/open_image.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/testing/crash_harness.h"

namespace uq::qcow2 {
namespace {

using testing::CrashRun;
using testing::MemEnv;

struct AmendCase {
  std::string name;
  std::string setup;  // shell commands that make img.qcow2 (and base.qcow2)
  uint32_t to_version;
  std::vector<std::string> snapshots;
  bool backing = false;
  std::string bitmaps;  // the bitmaps' names, as BitmapNames prints them
};
std::ostream& operator<<(std::ostream& o, const AmendCase& c) { return o << c.name; }

// Zero clusters of both kinds around data, at cluster size CS.
std::string ZeroWrites(uint64_t cs) {
  return fmt::format(
      "qemu-io -c 'write -P 0x11 0 {0}' -c 'write -z {1} {1}' -c 'write -z {2} {3}' "
      "-c 'write -P 0x22 {4} {1}' -c 'write -z {4} {1}' img.qcow2 >/dev/null",
      4 * cs, cs, 6 * cs, 3 * cs, 12 * cs);
}

// Drops the extra data of every snapshot entry (as QEMU before 4.x wrote
// version 2 tables), so that an upgrade must rewrite the table.
const char kStripExtraData[] = R"PY(python3 - <<'EOF'
import struct
f = open('img.qcow2', 'r+b')
hdr = f.read(72)
nb, = struct.unpack('>I', hdr[60:64]); off, = struct.unpack('>Q', hdr[64:72])
f.seek(off); data = f.read(1 << 20); out = b''; pos = 0
for i in range(nb):
    e = data[pos:pos + 40]; ids, names = struct.unpack('>HH', e[12:16])
    extra, = struct.unpack('>I', e[36:40])
    rest = data[pos + 40 + extra:pos + 40 + extra + ids + names]
    ent = e[:36] + struct.pack('>I', 0) + rest
    if i < nb - 1: ent += b'\0' * (-len(ent) % 8)
    out += ent; pos += (40 + extra + ids + names + 7) & ~7
f.seek(off); f.write(out + b'\0' * (len(data[:pos]) - len(out)))
EOF
true)PY";

class AmendCrashTest : public testing::CrashFixture<AmendCase> {
 protected:
  AmendCrashTest() : CrashFixture("amend-crash-") {}
  // The guest view of after.qcow2 (or of one of its snapshots).
  std::vector<std::byte> View(const std::string& image, const std::string& snapshot = "") {
    return testing::RawView(
        *scratch_, snapshot.empty() ? image : "-l snapshot.name=" + snapshot + " " + image);
  }
  // The names of the bitmaps qemu-img info lists, one per line, then
  // "ext" if the header has a bitmaps extension (which version 2 ignores).
  std::string BitmapNames(const std::string& image) {
    std::string out;
    // In parentheses: Sh redirects only the last command of a list.
    EXPECT_EQ(Sh("(qemu-img info --output=json " + image +
                     " | python3 -c 'import json,sys; d=json.load(sys.stdin)"
                     ".get(\"format-specific\",{}).get(\"data\",{}); "
                     "[print(b[\"name\"]) for b in d.get(\"bitmaps\",[])]' && " +
                     kHasBitmapsExtension + image + ")",
                 &out),
              0)
        << out;
    return out;
  }
  static constexpr char kHasBitmapsExtension[] = R"PY(python3 -c '
import struct, sys
f = open(sys.argv[1], "rb"); h = f.read(4096)
v, = struct.unpack(">I", h[4:8])
pos = 72 if v == 2 else struct.unpack(">I", h[100:104])[0]
while pos + 8 <= len(h):
    t, n = struct.unpack(">II", h[pos:pos + 8])
    if t == 0: break
    if t == 0x23852875: print("ext")
    pos += 8 + (n + 7) // 8 * 8
' )PY";
};

TEST_P(AmendCrashTest, EveryCrashPointLeavesTheOldOrTheNewVersion) {
  const AmendCase& c = GetParam();
  ASSERT_EQ(Sh(c.setup), 0);
  const std::vector<std::byte> active = View("img.qcow2");
  std::vector<std::vector<std::byte>> snaps;
  for (const std::string& s : c.snapshots) snaps.push_back(View("img.qcow2", s));
  std::string out;
  ASSERT_EQ(Sh("qemu-img check img.qcow2", &out), 0) << out;
  ASSERT_EQ(BitmapNames("img.qcow2"), c.bitmaps);

  auto run = [&](int64_t crash_at, bool* amended) -> uint64_t {
    MemEnv mem;
    testing::ImportImage(mem, dir_ + "/img.qcow2", "/w/img.qcow2");
    if (c.backing) testing::ImportImage(mem, dir_ + "/base.qcow2", "/w/base.qcow2");
    CrashRun crash(&mem, crash_at);
    *amended = false;
    auto opened = testing::OpenWritableImage(crash.env());
    if (opened.ok()) {
      std::unique_ptr<BlockDevice> dev = std::move(*opened);
      auto* image = dynamic_cast<Qcow2Image*>(dev.get());
      Status st = BlockOn(image->Amend(AmendOptions{.version = c.to_version}));
      *amended = st.ok();
      if (st.ok()) st = BlockOn(dev->Close());
      if (crash_at < 0) EXPECT_TRUE(st.ok()) << st.ToString();
    }
    const uint64_t count = crash.Finish();
    testing::ExportImage(mem, "/w/img.qcow2", dir_ + "/after.qcow2");
    return count;
  };
  auto version = [&]() {
    std::vector<std::byte> head = scratch_->Slurp("after.qcow2");
    return head.size() < 8 ? 0u : static_cast<uint32_t>(head[7]);
  };

  bool amended = false;
  const uint64_t boundaries = run(-1, &amended);
  ASSERT_TRUE(amended);
  ASSERT_GT(boundaries, 3u);
  ASSERT_EQ(Sh("qemu-img check after.qcow2", &out), 0) << out;
  ASSERT_EQ(version(), c.to_version);
  ASSERT_EQ(BitmapNames("after.qcow2"), c.to_version == 2 ? "" : c.bitmaps);

  int new_seen = 0;
  for (uint64_t n = 0; n < boundaries; n++) {
    run(static_cast<int64_t>(n), &amended);
    const std::string at = testing::CrashPoint(n);
    ASSERT_TRUE(testing::QemuCheckPasses(*scratch_, "after.qcow2")) << at;
    const uint32_t v = version();
    ASSERT_TRUE(v == 2 || v == 3) << at << ": version " << v;
    if (v == c.to_version) new_seen++;
    ASSERT_EQ(BitmapNames("after.qcow2"), v == 2 && c.to_version == 2 ? "" : c.bitmaps) << at;
    ASSERT_TRUE(View("after.qcow2") == active) << at << ": the guest view changed";
    for (size_t i = 0; i < c.snapshots.size(); i++) {
      ASSERT_TRUE(View("after.qcow2", c.snapshots[i]) == snaps[i])
          << at << ": snapshot " << c.snapshots[i] << " changed";
    }
  }
  EXPECT_GT(new_seen, 0);
  std::printf("%s: %llu crash points checked, %d with version %u\n", c.name.c_str(),
              static_cast<unsigned long long>(boundaries), new_seen, c.to_version);
}

const std::string kBase =
    "qemu-img create -q -f qcow2 base.qcow2 1M && "
    "qemu-io -c 'write -P 0xb1 0 1M' base.qcow2 >/dev/null && ";

INSTANTIATE_TEST_SUITE_P(
    Amends, AmendCrashTest,
    ::testing::Values(
        AmendCase{
            "downgrade_c512",
            "qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 1M && " + ZeroWrites(512),
            2},
        AmendCase{"downgrade_backing_snapshot",
                  kBase +
                      "qemu-img create -q -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 "
                      "img.qcow2 1M && " +
                      ZeroWrites(4096) +
                      " && qemu-img snapshot -c s1 img.qcow2 && "
                      "qemu-io -c 'write -z 0 8k' -c 'write -z 400k 8k' img.qcow2 >/dev/null",
                  2,
                  {"s1"},
                  true},
        AmendCase{"downgrade_shared_tables",
                  kBase + "qemu-img create -q -f qcow2 -o cluster_size=512 -b base.qcow2 -F qcow2 "
                          "img.qcow2 1M && qemu-io -c 'write -z 0 2k' -c 'write -P 1 40k 1k' "
                          "-c 'write -z 40k 512' -c 'write -z 100k 1k' img.qcow2 >/dev/null && "
                          "qemu-img snapshot -c s1 img.qcow2 && "
                          "qemu-io -c 'write -P 3 0 512' img.qcow2 >/dev/null",
                  2,
                  {"s1"},
                  true},
        AmendCase{"upgrade_v2_snapshot",
                  "qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k img.qcow2 1M && "
                  "qemu-io -c 'write -P 0x33 0 64k' img.qcow2 >/dev/null && "
                  "qemu-img snapshot -c s1 img.qcow2 && qemu-img snapshot -c s2 img.qcow2 && " +
                      std::string(kStripExtraData),
                  3,
                  {"s1", "s2"}},
        AmendCase{"upgrade_v2", "qemu-img create -q -f qcow2 -o compat=0.10 img.qcow2 1M", 3},
        AmendCase{"downgrade_bitmaps_c4k",
                  "qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 1M && " +
                      ZeroWrites(4096) +
                      " && qemu-img bitmap --add img.qcow2 b0 && "
                      "qemu-img bitmap --add -g 512 img.qcow2 b1 && "
                      "qemu-io -c 'write -P 0x44 100k 20k' -c 'write -z 300k 4k' img.qcow2 "
                      ">/dev/null",
                  2,
                  {},
                  false,
                  "b0\nb1\next\n"}),
    [](const ::testing::TestParamInfo<AmendCase>& info) { return info.param.name; });

}  // namespace
}  // namespace uq::qcow2
