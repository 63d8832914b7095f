// The arithmetic of qemu-img measure. Expected values are what qemu-img 7.2
// printed for the same inputs (`qemu-img measure -O qcow2 --size S -o ...`).
#include "qcow2/create/measure.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace uq::qcow2 {
namespace {

constexpr uint64_t K = 1024, M = K * K, G = M * K, T = G * K;

struct SizeCase {
  uint64_t size;
  std::string options;
  uint64_t required;
  uint64_t fully_allocated;
};

TEST(MeasureTest, SizesMatchQemuImg) {
  const SizeCase cases[] = {
      {0, "cluster_size=512", 1536, 1536},
      {0, "", 196608, 196608},
      {0, "cluster_size=2M", 6291456, 6291456},
      {0, "cluster_size=16k,extended_l2=on", 49152, 49152},
      {512, "cluster_size=512", 2560, 3072},
      {512, "", 327680, 393216},
      {512, "cluster_size=2M", 10485760, 12582912},
      {512, "cluster_size=16k,extended_l2=on", 81920, 98304},
      {1 * G, "", 393216, 1074135040},
      {1 * G, "cluster_size=512", 21385216, 1095127040},
      {1 * G, "cluster_size=2M", 10485760, 1084227584},
      {1 * G, "cluster_size=512,refcount_bits=1", 17311232, 1091053056},
      {1 * G, "cluster_size=64k,refcount_bits=64", 524288, 1074266112},
      {1 * G, "cluster_size=16k,extended_l2=on", 1245184, 1074987008},
      {1 * G, "extended_l2=on", 524288, 1074266112},
      {1 * G, "cluster_size=2M,extended_l2=on,refcount_bits=1", 10485760, 1084227584},
      {1 * G, "preallocation=full", 1074135040, 1074135040},
      {1 * G, "preallocation=falloc", 1074135040, 1074135040},
      {1 * G, "preallocation=metadata", 393216, 1074135040},
      {1000001, "cluster_size=512", 21504, 1021952},
      {1000001, "", 327680, 1376256},
      {1000001, "cluster_size=512,refcount_bits=1", 17920, 1018368},
      {1000001, "cluster_size=16k,extended_l2=on", 81920, 1097728},
      {1 * T, "", 168034304, 1099679662080},
      {1 * T, "cluster_size=2M", 12582912, 1099524210688},
      {1 * T, "refcount_bits=64", 268697600, 1099780325376},
      {1 * T, "cluster_size=16k,extended_l2=on", 1208745984, 1100720373760},
      {1 * T, "cluster_size=2M,extended_l2=on,refcount_bits=1", 16777216, 1099528404992},
  };
  for (const SizeCase& c : cases) {
    SCOPED_TRACE(std::to_string(c.size) + " " + c.options);
    Result<Qcow2MeasureOptions> o = ParseQcow2MeasureOptions(c.options);
    ASSERT_TRUE(o.ok()) << o.status().ToString();
    Result<Measurement> m = MeasureQcow2Size(c.size, *o);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    EXPECT_EQ(m->required, c.required);
    EXPECT_EQ(m->fully_allocated, c.fully_allocated);
    EXPECT_FALSE(m->bitmaps.has_value());
  }
}

TEST(MeasureTest, TooLargeForTheL1Table) {
  // 1 TiB needs a 64 MiB L1 table with 512-byte clusters; QEMU allows 32.
  Result<Qcow2MeasureOptions> o = ParseQcow2MeasureOptions("cluster_size=512");
  ASSERT_TRUE(o.ok());
  Result<Measurement> m = MeasureQcow2Size(1 * T, *o);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().message(), "The image size is too large (try using a larger cluster size)");
  // The largest size that fits: 4 Mi L2 tables of 64 entries of 512 bytes.
  EXPECT_TRUE(MeasureQcow2Size(128 * G, *o).ok());
  EXPECT_FALSE(MeasureQcow2Size(128 * G + 1, *o).ok());
}

TEST(MeasureTest, OptionErrorsAreQemuImgs) {
  const std::pair<std::string, std::string> cases[] = {
      {"foo=bar", "Invalid parameter 'foo'"},
      {"encrypt.foo=1", "Invalid parameter 'encrypt.foo'"},
      {",", "Invalid option list: ,"},
      {"cluster_size=3k", "Cluster size must be a power of two between 512 and 2048k"},
      {"cluster_size=4M", "Cluster size must be a power of two between 512 and 2048k"},
      {"cluster_size=4294967808", "Cluster size must be a power of two between 512 and 2048k"},
      {"cluster_size=1k,extended_l2=on",
       "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"},
      {"compat=v2", "Invalid compatibility level: 'v2'"},
      {"compat=", "Invalid compatibility level: ''"},
      {"refcount_bits=3", "Refcount width must be a power of two and may not exceed 64 bits"},
      {"refcount_bits=128", "Refcount width must be a power of two and may not exceed 64 bits"},
      {"compat=0.10,refcount_bits=8",
       "Different refcount widths than 16 bits require compatibility level 1.1 or above (use "
       "compat=1.1 or greater)"},
      {"preallocation=bogus", "invalid parameter value: bogus"},
      {"preallocation=OFF", "invalid parameter value: OFF"},
      {"refcount_bits=3,preallocation=bogus",
       "Refcount width must be a power of two and may not exceed 64 bits"},
      {"extended_l2=maybe", "Parameter 'extended_l2' expects 'on' or 'off'"},
      {"refcount_bits=abc", "Parameter 'refcount_bits' expects a number"},
      {"encrypt.iter-time=abc", "Parameter 'encrypt.iter-time' expects a number"},
  };
  for (const auto& [options, message] : cases) {
    SCOPED_TRACE(options);
    Result<Qcow2MeasureOptions> o = ParseQcow2MeasureOptions(options);
    ASSERT_FALSE(o.ok());
    EXPECT_EQ(o.status().message(), message);
  }
  EXPECT_EQ(ParseQcow2MeasureOptions("encrypt.format=luks").status().code(), Code::kNotSupported);
}

TEST(MeasureTest, MeasureIgnoresWhatCreateWouldRefuse) {
  // qemu-img measure judges only the keys it needs.
  for (const char* options :
       {"compat=0.10,lazy_refcounts=on", "compression_type=bad", "compat=0.10,extended_l2=on",
        "data_file=x,data_file_raw=on", "encryption=on", "nocow=on", "encrypt.format=aes",
        "encrypt.cipher-alg=foo", "size=5G", "data_file=", "backing_fmt=raw",
        "cluster_size=64k,cluster_size=512"}) {
    SCOPED_TRACE(options);
    EXPECT_TRUE(ParseQcow2MeasureOptions(options).ok());
  }
  // The last of a repeated key wins.
  Result<Qcow2MeasureOptions> o = ParseQcow2MeasureOptions("cluster_size=64k,cluster_size=512");
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->geometry.cluster_size, 512u);
  o = ParseQcow2MeasureOptions("backing_file=");
  ASSERT_TRUE(o.ok());
  EXPECT_TRUE(o->backing_file);
}

TEST(MeasureTest, RawOptions) {
  EXPECT_TRUE(CheckRawMeasureOptions("").ok());
  EXPECT_TRUE(CheckRawMeasureOptions("nocow=on,extent_size_hint=1M,preallocation=bogus").ok());
  EXPECT_EQ(CheckRawMeasureOptions("cluster_size=1k").message(),
            "Invalid parameter 'cluster_size'");
  EXPECT_EQ(CheckRawMeasureOptions("nocow=maybe").message(),
            "Parameter 'nocow' expects 'on' or 'off'");
  EXPECT_EQ(MeasureRawSize(513).required, 1024u);
  EXPECT_EQ(MeasureRawSize(1536).fully_allocated, 1536u);
  EXPECT_EQ(MeasureRawImage(1000).required, 1000u);
}

TEST(MeasureTest, DataClustersCountWhole) {
  DataClusterCount count(64 * K);
  // Data inside one cluster counts the whole cluster; the walk resumes at
  // the cluster's end.
  EXPECT_EQ(count.AddData(4 * K, 2 * K), 64 * K);
  EXPECT_EQ(count.bytes(), 64 * K);
  // A run across clusters counts each cluster it touches.
  EXPECT_EQ(count.AddData(130 * K, 70 * K), 256 * K);
  EXPECT_EQ(count.bytes(), 64 * K + 128 * K);
  // Aligned runs count exactly.
  EXPECT_EQ(count.AddData(1 * M, 128 * K), 1 * M + 128 * K);
  EXPECT_EQ(count.bytes(), 64 * K + 128 * K + 128 * K);
}

TEST(MeasureTest, ImagesAndBitmaps) {
  Result<Qcow2MeasureOptions> o = ParseQcow2MeasureOptions("");
  ASSERT_TRUE(o.ok());
  // qemu-img measure -O qcow2 of an empty 64 MiB qcow2 v3 image with three
  // bitmaps: granularity 64 KiB and names "b0" and "b2", and 4 KiB named
  // "longername_bitmap".
  const BitmapToMeasure bitmaps[] = {{2, 64 * K}, {17, 4 * K}, {2, 64 * K}};
  Measurement m = MeasureQcow2Image(64 * M, 0, *o, std::span<const BitmapToMeasure>(bitmaps));
  EXPECT_EQ(m.required, 327680u);
  EXPECT_EQ(m.fully_allocated, 67436544u);
  EXPECT_EQ(m.bitmaps, 458752u);
  // The same, for 512-byte output clusters.
  o = ParseQcow2MeasureOptions("cluster_size=512");
  ASSERT_TRUE(o.ok());
  m = MeasureQcow2Image(64 * M, 0, *o, std::span<const BitmapToMeasure>(bitmaps));
  EXPECT_EQ(m.required, 1337856u);
  EXPECT_EQ(m.fully_allocated, 68446720u);
  EXPECT_EQ(m.bitmaps, 5120u);
  // A v2 output carries no bitmaps; neither does a source that cannot.
  o = ParseQcow2MeasureOptions("compat=0.10");
  ASSERT_TRUE(o.ok());
  EXPECT_FALSE(MeasureQcow2Image(64 * M, 0, *o, std::span<const BitmapToMeasure>(bitmaps))
                   .bitmaps.has_value());
  o = ParseQcow2MeasureOptions("");
  ASSERT_TRUE(o.ok());
  EXPECT_FALSE(MeasureQcow2Image(64 * M, 0, *o, std::nullopt).bitmaps.has_value());
  // No bitmaps at all, from a v3 source: 0.
  EXPECT_EQ(MeasureQcow2Image(64 * M, 0, *o, std::span<const BitmapToMeasure>()).bitmaps, 0u);
  // A new backing file: every cluster counts (an empty 64 MiB source).
  o = ParseQcow2MeasureOptions("backing_file=x");
  ASSERT_TRUE(o.ok());
  m = MeasureQcow2Image(64 * M, 0, *o, std::nullopt);
  EXPECT_EQ(m.required, 67436544u);
  EXPECT_EQ(m.fully_allocated, 67436544u);
}

}  // namespace
}  // namespace uq::qcow2
