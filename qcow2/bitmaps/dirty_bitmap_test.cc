#include "qcow2/bitmaps/dirty_bitmap.h"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace uq::qcow2 {
namespace {

using Extents = std::vector<std::pair<uint64_t, uint64_t>>;

Extents Of(const DirtyBitmap& b) {
  Extents out;
  for (const auto& e : b.DirtyExtents()) out.emplace_back(e.offset, e.length);
  return out;
}

TEST(DirtyBitmapTest, SetRoundsOutToTheGranularity) {
  DirtyBitmap b(1 << 20, 16);  // 16 granules of 64 KiB
  EXPECT_EQ(b.bit_count(), 16u);
  EXPECT_FALSE(b.Any());
  b.Set(65535, 2);  // touches granules 0 and 1
  EXPECT_EQ(Of(b), (Extents{{0, 131072}}));
  b.Set(5 << 16, 1);
  EXPECT_EQ(Of(b), (Extents{{0, 131072}, {5 << 16, 65536}}));
  b.Set((1 << 20) - 1, 100);  // clamped to the disk
  EXPECT_TRUE(b.Get(15));
  b.Clear();
  EXPECT_TRUE(Of(b).empty());
}

TEST(DirtyBitmapTest, ExtentsAreClampedToAShortLastGranule) {
  DirtyBitmap b(100 * 512 + 512, 12);  // last granule 1 KiB of 4 KiB
  b.Set(b.disk_size() - 1, 1);
  EXPECT_EQ(Of(b), (Extents{{12 * 4096, b.disk_size() - 12 * 4096}}));
}

TEST(DirtyBitmapTest, ExtentsAcrossWords) {
  DirtyBitmap b(1000ull << 9, 9);
  b.Set(60 << 9, 80 << 9);  // bits 60..139, across two word boundaries
  b.Set(999 << 9, 512);
  EXPECT_EQ(Of(b), (Extents{{60 << 9, 80 << 9}, {999 << 9, 512}}));
}

TEST(DirtyBitmapTest, SerializationIsLittleEndianBitOrder) {
  DirtyBitmap b(64 * 4096, 12);
  b.Set(0, 1);         // bit 0 -> byte 0 bit 0
  b.Set(9 * 4096, 1);  // bit 9 -> byte 1 bit 1
  std::vector<std::byte> out(8);
  b.Serialize(0, out);
  EXPECT_EQ(out[0], std::byte{1});
  EXPECT_EQ(out[1], std::byte{2});
  DirtyBitmap c(64 * 4096, 12);
  c.Deserialize(0, out);
  EXPECT_EQ(Of(c), Of(b));
  // Bits past the end are dropped.
  DirtyBitmap d(3 * 4096, 12);
  std::vector<std::byte> ones(1, std::byte{0xff});
  d.Deserialize(0, ones);
  EXPECT_EQ(Of(d), (Extents{{0, 3 * 4096}}));
  DirtyBitmap e(3 * 4096, 12);
  e.SetSerializedOnes(0, 4096);
  EXPECT_EQ(Of(e), (Extents{{0, 3 * 4096}}));
}

TEST(DirtyBitmapTest, MergeAcrossGranularities) {
  DirtyBitmap fine(1 << 20, 9), coarse(1 << 20, 16);
  fine.Set(70000, 1);
  coarse.Merge(fine);
  EXPECT_EQ(Of(coarse), (Extents{{65536, 65536}}));
  fine.Merge(coarse);
  EXPECT_EQ(Of(fine), (Extents{{65536, 65536}}));
}

TEST(DirtyBitmapTest, ConcurrentSetsLoseNoBit) {
  DirtyBitmap b(64ull << 20, 9);  // 131072 bits
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&b, t] {
      for (uint64_t i = t; i < b.bit_count(); i += 4) b.Set(i << 9, 512);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(Of(b), (Extents{{0, 64ull << 20}}));
}

}  // namespace
}  // namespace uq::qcow2
