// Expected texts are qemu-img 7.2's output for images with the same fields.
#include "tools/info_format.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <ctime>
#include <limits>
#include <vector>

#include "tools/size_format.h"

namespace uq::tools {
namespace {

using qcow2::ImageInfo;
using qcow2::Qcow2SpecificInfo;
using qcow2::SnapshotInfo;

class UtcEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    setenv("TZ", "UTC", 1);
    tzset();
  }
};
const auto* const kUtc = ::testing::AddGlobalTestEnvironment(new UtcEnvironment);

Qcow2SpecificInfo V3() {
  Qcow2SpecificInfo q;
  q.compat = "1.1";
  q.compression_type = "zlib";
  return q;
}

// qemu-img create -f qcow2 -F qcow2 -b mid.qcow2 top.qcow2 100M, data
// written, two snapshots taken.
ImageInfo Top() {
  ImageInfo info;
  info.filename = "top.qcow2";
  info.format = "qcow2";
  info.virtual_size = 104857600;
  info.actual_size = 1789952;
  info.cluster_size = 65536;
  info.backing_filename = "mid.qcow2";
  info.full_backing_filename = "mid.qcow2";
  info.backing_format = "qcow2";
  info.qcow2 = V3();
  SnapshotInfo s1;
  s1.id = "1";
  s1.name = "snap1";
  s1.date_sec = 1795456544;
  s1.date_nsec = 841513000;
  s1.icount = 0;
  SnapshotInfo s2 = s1;
  s2.id = "2";
  s2.name = "second snap";
  s2.date_nsec = 887285000;
  info.snapshots = {s1, s2};
  return info;
}

ImageInfo Mid() {
  ImageInfo info;
  info.filename = "mid.qcow2";
  info.format = "qcow2";
  info.virtual_size = 67108864;
  info.actual_size = 200704;
  info.cluster_size = 65536;
  info.backing_filename = "base.raw";
  info.full_backing_filename = "base.raw";
  info.backing_format = "raw";
  info.qcow2 = V3();
  return info;
}

ImageInfo Base() {
  ImageInfo info;
  info.filename = "base.raw";
  info.format = "raw";
  info.virtual_size = 67108864;
  info.actual_size = 4096;
  return info;
}

TEST(HumanSizeTest, MatchesQemuImg) {
  EXPECT_EQ(HumanSize(0), "0 B");
  EXPECT_EQ(HumanSize(1), "1 B");
  EXPECT_EQ(HumanSize(512), "512 B");
  EXPECT_EQ(HumanSize(999), "999 B");
  EXPECT_EQ(HumanSize(1000), "0.977 KiB");
  EXPECT_EQ(HumanSize(1024), "1 KiB");
  EXPECT_EQ(HumanSize(1536), "1.5 KiB");
  EXPECT_EQ(HumanSize(10240), "10 KiB");
  EXPECT_EQ(HumanSize(200704), "196 KiB");
  EXPECT_EQ(HumanSize(1023488), "1e+03 KiB");  // sic: qemu-img prints this too
  EXPECT_EQ(HumanSize(1048064), "1 MiB");
  EXPECT_EQ(HumanSize(1321206), "1.26 MiB");
  EXPECT_EQ(HumanSize(1789952), "1.71 MiB");
  EXPECT_EQ(HumanSize(64 << 20), "64 MiB");
  EXPECT_EQ(HumanSize(104857600), "100 MiB");
  EXPECT_EQ(HumanSize(1ull << 30), "1 GiB");
  EXPECT_EQ(HumanSize(1ull << 40), "1 TiB");
  EXPECT_EQ(HumanSize(1ull << 50), "1 PiB");
  EXPECT_EQ(HumanSize(1ull << 60), "1 EiB");
  EXPECT_EQ(HumanSize(std::numeric_limits<uint64_t>::max()), "16 EiB");
}

TEST(InfoJsonTest, QcowWithBackingAndSnapshots) {
  std::vector<ImageInfo> infos = {Top()};
  EXPECT_EQ(FormatInfoJson(infos, false), R"({
    "backing-filename-format": "qcow2",
    "snapshots": [
        {
            "icount": 0,
            "vm-clock-nsec": 0,
            "name": "snap1",
            "date-sec": 1795456544,
            "date-nsec": 841513000,
            "vm-clock-sec": 0,
            "id": "1",
            "vm-state-size": 0
        },
        {
            "icount": 0,
            "vm-clock-nsec": 0,
            "name": "second snap",
            "date-sec": 1795456544,
            "date-nsec": 887285000,
            "vm-clock-sec": 0,
            "id": "2",
            "vm-state-size": 0
        }
    ],
    "virtual-size": 104857600,
    "filename": "top.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 1789952,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "full-backing-filename": "mid.qcow2",
    "backing-filename": "mid.qcow2",
    "dirty-flag": false
}
)");
}

TEST(InfoJsonTest, BackingChainIsAnArray) {
  std::vector<ImageInfo> infos = {Mid(), Base()};
  EXPECT_EQ(FormatInfoJson(infos, true), R"([
    {
        "backing-filename-format": "raw",
        "virtual-size": 67108864,
        "filename": "mid.qcow2",
        "cluster-size": 65536,
        "format": "qcow2",
        "actual-size": 200704,
        "format-specific": {
            "type": "qcow2",
            "data": {
                "compat": "1.1",
                "compression-type": "zlib",
                "lazy-refcounts": false,
                "refcount-bits": 16,
                "corrupt": false,
                "extended-l2": false
            }
        },
        "full-backing-filename": "base.raw",
        "backing-filename": "base.raw",
        "dirty-flag": false
    },
    {
        "virtual-size": 67108864,
        "filename": "base.raw",
        "format": "raw",
        "actual-size": 4096,
        "dirty-flag": false
    }
]
)");
}

TEST(InfoJsonTest, Version2HasNoV3Fields) {
  ImageInfo info;
  info.filename = "v2.qcow2";
  info.format = "qcow2";
  info.virtual_size = 10485760;
  info.actual_size = 200704;
  info.cluster_size = 65536;
  info.qcow2 = V3();
  info.qcow2->compat = "0.10";
  EXPECT_EQ(ImageInfoToJson(info).dump(), R"({"virtual-size":10485760,"filename":"v2.qcow2",)"
                                          R"("cluster-size":65536,"format":"qcow2",)"
                                          R"("actual-size":200704,"format-specific":{"type":)"
                                          R"("qcow2","data":{"compat":"0.10",)"
                                          R"("compression-type":"zlib","refcount-bits":16}},)"
                                          R"("dirty-flag":false})");
  EXPECT_EQ(FormatInfoHuman(info), R"(image: v2.qcow2
file format: qcow2
virtual size: 10 MiB (10485760 bytes)
disk size: 196 KiB
cluster_size: 65536
Format specific information:
    compat: 0.10
    compression type: zlib
    refcount bits: 16
)");
}

ImageInfo WithDataFile() {
  ImageInfo info;
  info.filename = "v3.qcow2";
  info.format = "qcow2";
  info.virtual_size = 1073741824;
  info.actual_size = 1101824;
  info.cluster_size = 16384;
  Qcow2SpecificInfo q = V3();
  q.compression_type = "zstd";
  q.lazy_refcounts = true;
  q.refcount_bits = 64;
  q.data_file = "v3.data";
  q.data_file_raw = true;
  q.extended_l2 = true;
  info.qcow2 = q;
  return info;
}

TEST(InfoJsonTest, DataFileAndFeatures) {
  std::vector<ImageInfo> infos = {WithDataFile()};
  EXPECT_EQ(FormatInfoJson(infos, false), R"({
    "virtual-size": 1073741824,
    "filename": "v3.qcow2",
    "cluster-size": 16384,
    "format": "qcow2",
    "actual-size": 1101824,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zstd",
            "lazy-refcounts": true,
            "refcount-bits": 64,
            "data-file": "v3.data",
            "data-file-raw": true,
            "corrupt": false,
            "extended-l2": true
        }
    },
    "dirty-flag": false
}
)");
}

TEST(InfoHumanTest, DataFileAndFeatures) {
  EXPECT_EQ(FormatInfoHuman(WithDataFile()), R"(image: v3.qcow2
file format: qcow2
virtual size: 1 GiB (1073741824 bytes)
disk size: 1.05 MiB
cluster_size: 16384
Format specific information:
    compat: 1.1
    compression type: zstd
    lazy refcounts: true
    refcount bits: 64
    data file: v3.data
    data file raw: true
    corrupt: false
    extended l2: true
)");
}

TEST(InfoHumanTest, DirtyAndCorrupt) {
  ImageInfo info;
  info.filename = "d.qcow2";
  info.format = "qcow2";
  info.virtual_size = 1048576;
  info.actual_size = 200704;
  info.cluster_size = 65536;
  info.dirty_flag = true;
  info.qcow2 = V3();
  info.qcow2->corrupt = true;
  EXPECT_EQ(FormatInfoHuman(info), R"(image: d.qcow2
file format: qcow2
virtual size: 1 MiB (1048576 bytes)
disk size: 196 KiB
cluster_size: 65536
cleanly shut down: no
Format specific information:
    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    refcount bits: 16
    corrupt: true
    extended l2: false
)");
  EXPECT_EQ(ImageInfoToJson(info)["dirty-flag"], true);
}

TEST(InfoHumanTest, BackingChainWithSnapshots) {
  std::vector<ImageInfo> infos = {Top(), Mid(), Base()};
  EXPECT_EQ(FormatInfoHumanList(infos), R"(image: top.qcow2
file format: qcow2
virtual size: 100 MiB (104857600 bytes)
disk size: 1.71 MiB
cluster_size: 65536
backing file: mid.qcow2
backing file format: qcow2
Snapshot list:
ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT
1         snap1                 0 B 2026-11-23 17:55:44 00:00:00.000          0
2         second snap           0 B 2026-11-23 17:55:44 00:00:00.000          0
Format specific information:
    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    refcount bits: 16
    corrupt: false
    extended l2: false

image: mid.qcow2
file format: qcow2
virtual size: 64 MiB (67108864 bytes)
disk size: 196 KiB
cluster_size: 65536
backing file: base.raw
backing file format: raw
Format specific information:
    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    refcount bits: 16
    corrupt: false
    extended l2: false

image: base.raw
file format: raw
virtual size: 64 MiB (67108864 bytes)
disk size: 4 KiB
)");
}

TEST(InfoHumanTest, BackingPathNotes) {
  ImageInfo info = Mid();
  info.backing_filename = "../v2.qcow2";
  info.full_backing_filename = "sub/../v2.qcow2";
  info.backing_format.reset();
  info.qcow2.reset();
  EXPECT_EQ(FormatInfoHuman(info), R"(image: mid.qcow2
file format: qcow2
virtual size: 64 MiB (67108864 bytes)
disk size: 196 KiB
cluster_size: 65536
backing file: ../v2.qcow2 (actual path: sub/../v2.qcow2)
)");
  info.full_backing_filename.reset();
  EXPECT_NE(
      FormatInfoHuman(info).find("backing file: ../v2.qcow2 (cannot determine actual path)\n"),
      std::string::npos);
  nlohmann::ordered_json j = ImageInfoToJson(info);
  EXPECT_FALSE(j.contains("full-backing-filename"));
  EXPECT_FALSE(j.contains("backing-filename-format"));
  EXPECT_EQ(j["backing-filename"], "../v2.qcow2");
}

TEST(SnapshotTest, ClockSplitAndUnknownIcount) {
  SnapshotInfo s;
  s.id = "7";
  s.name = "vm state";
  s.vm_state_size = 1321206;
  s.date_sec = 0;
  s.vm_clock_nsec = 3723'456'789'012ull;  // 1h 2m 3.456789012s
  s.icount = -1;
  EXPECT_EQ(SnapshotTableRow(s),
            "7         vm state         1.26 MiB 1970-01-01 00:00:00 01:02:03.456           ");
  ImageInfo info;
  info.snapshots = {s};
  nlohmann::ordered_json j = ImageInfoToJson(info)["snapshots"][0];
  EXPECT_FALSE(j.contains("icount"));
  EXPECT_EQ(j["vm-clock-sec"], 3723u);
  EXPECT_EQ(j["vm-clock-nsec"], 456'789'012u);
  EXPECT_EQ(j.begin().key(), "vm-clock-nsec");
}

TEST(SnapshotTest, HeaderAndLongFields) {
  EXPECT_EQ(SnapshotTableHeader(),
            "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT");
  SnapshotInfo s;
  s.id = "12345678901";
  s.name = "a-rather-long-snapshot-name";
  s.icount = 42;
  EXPECT_EQ(
      SnapshotTableRow(s),
      "12345678901 a-rather-long-snapshot-name      0 B 1970-01-01 00:00:00 00:00:00.000         "
      "42");
}

TEST(InfoJsonTest, NonAsciiIsEscapedAndBadUtf8Replaced) {
  ImageInfo info = Base();
  info.filename = "caf\xc3\xa9\xff.raw";
  std::string json = FormatInfoJson(std::span<const ImageInfo>(&info, 1), false);
  EXPECT_NE(json.find(R"("filename": "caf\u00e9\ufffd.raw")"), std::string::npos) << json;
}

// qemu-img create -f qcow2 -o data_file=d.raw,extended_l2=on,cluster_size=2M
// df.qcow2 1G, then qemu-img bitmap --add -g 512 bb, --add --disable -g 2G big,
// then bitmap "bb" marked in use (flags patched to 3).
ImageInfo WithBitmaps() {
  ImageInfo info;
  info.filename = "df.qcow2";
  info.format = "qcow2";
  info.virtual_size = 1073741824;
  info.actual_size = 6324224;
  info.cluster_size = 2097152;
  Qcow2SpecificInfo q = V3();
  q.data_file = "d.raw";
  q.extended_l2 = true;
  q.bitmaps = {{"bb", 512, true, true}, {"big", 2147483648, false, false}};
  info.qcow2 = q;
  return info;
}

TEST(InfoJsonTest, Bitmaps) {
  std::vector<ImageInfo> infos = {WithBitmaps()};
  EXPECT_EQ(FormatInfoJson(infos, false), R"({
    "virtual-size": 1073741824,
    "filename": "df.qcow2",
    "cluster-size": 2097152,
    "format": "qcow2",
    "actual-size": 6324224,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "bitmaps": [
                {
                    "flags": [
                        "in-use",
                        "auto"
                    ],
                    "name": "bb",
                    "granularity": 512
                },
                {
                    "flags": [
                    ],
                    "name": "big",
                    "granularity": 2147483648
                }
            ],
            "refcount-bits": 16,
            "data-file": "d.raw",
            "data-file-raw": false,
            "corrupt": false,
            "extended-l2": true
        }
    },
    "dirty-flag": false
}
)");
}

TEST(InfoHumanTest, Bitmaps) {
  EXPECT_EQ(FormatInfoHuman(WithBitmaps()), R"(image: df.qcow2
file format: qcow2
virtual size: 1 GiB (1073741824 bytes)
disk size: 6.03 MiB
cluster_size: 2097152
Format specific information:
    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    bitmaps:
        [0]:
            flags:
                [0]: in-use
                [1]: auto
            name: bb
            granularity: 512
        [1]:
            flags:
            name: big
            granularity: 2147483648
    refcount bits: 16
    data file: d.raw
    data file raw: false
    corrupt: false
    extended l2: true
)");
}

// A name that looks like JSON punctuation stays a string: only real empty
// lists are split over two lines.
TEST(InfoJsonTest, EmptyListSplitLeavesStringsAlone) {
  ImageInfo info = WithBitmaps();
  info.qcow2->bitmaps = {{"[]", 65536, false, false}, {"x\": [],", 65536, false, true}};
  std::string json = FormatInfoJson(std::span<const ImageInfo>(&info, 1), false);
  EXPECT_NE(json.find(R"("name": "[]",)"), std::string::npos) << json;
  EXPECT_NE(json.find(R"("name": "x\": [],",)"), std::string::npos) << json;
  EXPECT_NE(json.find("\"flags\": [\n                    ],\n"), std::string::npos) << json;
}

// qemu-img prints vm-state-size as a signed 64-bit number in JSON, and the
// unsigned size in the table: 16 EiB for all ones (-1), 8 EiB for 2^63.
TEST(SnapshotTest, HugeVmStateSizeIsSignedInJson) {
  SnapshotInfo s;
  s.id = "1";
  s.name = "s1";
  s.vm_state_size = ~uint64_t{0};
  s.icount = 0;
  ImageInfo info = WithBitmaps();
  SnapshotInfo s2 = s;
  s2.id = "2";
  s2.vm_state_size = uint64_t{1} << 63;
  info.snapshots = {s, s2};
  nlohmann::ordered_json j = ImageInfoToJson(info);
  EXPECT_EQ(j["snapshots"][0]["vm-state-size"].dump(), "-1");
  EXPECT_EQ(j["snapshots"][1]["vm-state-size"].dump(), "-9223372036854775808");
  EXPECT_EQ(SnapshotTableRow(s),
            "1         s1                 16 EiB 1970-01-01 00:00:00 00:00:00.000          0");
  EXPECT_EQ(SnapshotTableRow(s2),
            "2         s1                  8 EiB 1970-01-01 00:00:00 00:00:00.000          0");
}

}  // namespace
}  // namespace uq::tools
