#include "qcow2/refcount_codec.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

namespace uq::qcow2 {
namespace {

std::vector<std::byte> Bytes(std::initializer_list<int> v) {
  std::vector<std::byte> out;
  for (int b : v) out.push_back(static_cast<std::byte>(b));
  return out;
}

// A bit-by-bit reference model of the layout described in the header:
// sub-byte entries fill each byte from its least significant bit, wider
// entries are big-endian.
uint64_t ReferenceGet(const std::vector<std::byte>& block, uint64_t index, uint32_t order) {
  const uint32_t bits = 1u << order;
  if (bits < 8) {
    uint64_t v = 0;
    for (uint32_t b = 0; b < bits; b++) {
      uint64_t pos = index * bits + b;
      uint64_t bit = (static_cast<uint8_t>(block[pos / 8]) >> (pos % 8)) & 1;
      v |= bit << b;
    }
    return v;
  }
  uint64_t v = 0;
  for (uint32_t i = 0; i < bits / 8; i++) {
    v = (v << 8) | static_cast<uint8_t>(block[index * (bits / 8) + i]);
  }
  return v;
}

TEST(RefcountCodecTest, MaxRefcount) {
  EXPECT_EQ(MaxRefcount(0), 1u);
  EXPECT_EQ(MaxRefcount(1), 3u);
  EXPECT_EQ(MaxRefcount(2), 15u);
  EXPECT_EQ(MaxRefcount(3), 255u);
  EXPECT_EQ(MaxRefcount(4), 65535u);
  EXPECT_EQ(MaxRefcount(5), 0xffffffffu);
  EXPECT_EQ(MaxRefcount(6), ~uint64_t{0});
}

TEST(RefcountCodecTest, EntriesPerBlock) {
  for (uint32_t cb = 9; cb <= 21; cb++) {
    for (uint32_t order = 0; order <= 6; order++) {
      uint64_t cluster_size = uint64_t{1} << cb;
      EXPECT_EQ(RefcountEntriesPerBlock(cb, order), cluster_size * 8 / (1u << order))
          << "cluster_bits " << cb << " order " << order;
      EXPECT_EQ(RefcountBytesFor(RefcountEntriesPerBlock(cb, order), order), cluster_size);
    }
  }
  // The default: 64 KiB clusters, 16-bit refcounts.
  EXPECT_EQ(RefcountEntriesPerBlock(16, 4), 32768u);
  EXPECT_EQ(RefcountEntriesPerBlock(9, 6), 64u);
}

TEST(RefcountCodecTest, BytesFor) {
  EXPECT_EQ(RefcountBytesFor(0, 0), 0u);
  EXPECT_EQ(RefcountBytesFor(1, 0), 1u);
  EXPECT_EQ(RefcountBytesFor(8, 0), 1u);
  EXPECT_EQ(RefcountBytesFor(9, 0), 2u);
  EXPECT_EQ(RefcountBytesFor(3, 1), 1u);
  EXPECT_EQ(RefcountBytesFor(5, 1), 2u);
  EXPECT_EQ(RefcountBytesFor(3, 2), 2u);
  EXPECT_EQ(RefcountBytesFor(3, 4), 6u);
  EXPECT_EQ(RefcountBytesFor(3, 6), 24u);
}

// The exact bytes each width produces, as QEMU's get_refcount_ro* read them.
TEST(RefcountCodecTest, KnownLayouts) {
  {
    auto b = Bytes({0, 0});
    SetRefcount(b, 0, 0, 1);
    EXPECT_EQ(b, Bytes({0x01, 0}));
    SetRefcount(b, 7, 0, 1);
    EXPECT_EQ(b, Bytes({0x81, 0}));
    SetRefcount(b, 9, 0, 1);
    EXPECT_EQ(b, Bytes({0x81, 0x02}));
    SetRefcount(b, 0, 0, 0);
    EXPECT_EQ(b, Bytes({0x80, 0x02}));
  }
  {
    auto b = Bytes({0, 0});
    SetRefcount(b, 0, 1, 1);
    SetRefcount(b, 1, 1, 2);
    SetRefcount(b, 3, 1, 3);
    EXPECT_EQ(b, Bytes({0xc9, 0}));  // 11 00 10 01
    SetRefcount(b, 4, 1, 2);
    EXPECT_EQ(b, Bytes({0xc9, 0x02}));
  }
  {
    auto b = Bytes({0, 0});
    SetRefcount(b, 0, 2, 0x3);
    SetRefcount(b, 1, 2, 0xa);
    SetRefcount(b, 2, 2, 0xf);
    EXPECT_EQ(b, Bytes({0xa3, 0x0f}));
  }
  {
    auto b = Bytes({0, 0, 0, 0});
    SetRefcount(b, 1, 3, 0xab);
    EXPECT_EQ(b, Bytes({0, 0xab, 0, 0}));
  }
  {
    auto b = Bytes({0, 0, 0, 0});
    SetRefcount(b, 1, 4, 0x1234);
    EXPECT_EQ(b, Bytes({0, 0, 0x12, 0x34}));
  }
  {
    auto b = Bytes({0, 0, 0, 0, 0, 0, 0, 0});
    SetRefcount(b, 1, 5, 0x01020304);
    EXPECT_EQ(b, Bytes({0, 0, 0, 0, 1, 2, 3, 4}));
  }
  {
    std::vector<std::byte> b(16);
    SetRefcount(b, 1, 6, 0x0102030405060708ull);
    EXPECT_EQ(b, Bytes({0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8}));
    SetRefcount(b, 0, 6, ~uint64_t{0});
    EXPECT_EQ(GetRefcount(b, 0, 6), ~uint64_t{0});
  }
}

TEST(RefcountCodecTest, GetDecodesEveryByteValue) {
  // Sub-byte widths: every byte value decodes into the right entries.
  for (uint32_t order = 0; order <= 2; order++) {
    const uint32_t bits = 1u << order;
    for (int v = 0; v < 256; v++) {
      std::vector<std::byte> b = {static_cast<std::byte>(v)};
      for (uint32_t i = 0; i < 8 / bits; i++) {
        EXPECT_EQ(GetRefcount(b, i, order),
                  (static_cast<uint32_t>(v) >> (i * bits)) & ((1u << bits) - 1));
      }
    }
  }
}

// Every index of a block, every value for widths up to 8 bits and edge values
// beyond: setting one entry changes exactly that entry.
TEST(RefcountCodecTest, SetTouchesOnlyItsEntry) {
  std::mt19937_64 rng(42);
  for (uint32_t order = 0; order <= 6; order++) {
    const uint64_t max = MaxRefcount(order);
    const uint64_t entries = 64;
    std::vector<std::byte> block(RefcountBytesFor(entries, order));
    for (auto& byte : block) byte = static_cast<std::byte>(rng());
    std::vector<uint64_t> values;
    if (max <= 255) {
      for (uint64_t v = 0; v <= max; v++) values.push_back(v);
    } else {
      values = {0, 1, 2, 0x7f, 0x80, 0xff, 0x100, max / 2, max - 1, max};
      for (int i = 0; i < 8; i++) values.push_back(rng() & max);
    }
    for (uint64_t index = 0; index < entries; index++) {
      for (uint64_t value : values) {
        std::vector<std::byte> before = block;
        SetRefcount(block, index, order, value);
        ASSERT_EQ(GetRefcount(block, index, order), value)
            << "order " << order << " index " << index;
        ASSERT_EQ(ReferenceGet(block, index, order), value);
        for (uint64_t other = 0; other < entries; other++) {
          if (other == index) continue;
          ASSERT_EQ(GetRefcount(block, other, order), GetRefcount(before, other, order))
              << "order " << order << " set " << index << " changed " << other;
        }
      }
    }
    // Get agrees with the reference model on random contents.
    for (auto& byte : block) byte = static_cast<std::byte>(rng());
    for (uint64_t index = 0; index < entries; index++) {
      EXPECT_EQ(GetRefcount(block, index, order), ReferenceGet(block, index, order));
    }
  }
}

// The last entry of a full-sized block is addressable for every width.
TEST(RefcountCodecTest, LastEntryOfBlock) {
  for (uint32_t cb = 9; cb <= 16; cb++) {
    std::vector<std::byte> block(uint64_t{1} << cb);
    for (uint32_t order = 0; order <= 6; order++) {
      uint64_t last = RefcountEntriesPerBlock(cb, order) - 1;
      SetRefcount(block, last, order, 1);
      EXPECT_EQ(GetRefcount(block, last, order), 1u);
      SetRefcount(block, last, order, 0);
      EXPECT_EQ(GetRefcount(block, last, order), 0u);
    }
    for (auto b : block) ASSERT_EQ(b, std::byte{0});
  }
}

}  // namespace
}  // namespace uq::qcow2
