#include "tests/power/block_pattern.h"

#include <algorithm>
#include <array>
#include <cstring>

namespace uq::power {
namespace {

// splitmix64: a tiny, well-mixed generator; speed matters more than quality here.
uint64_t Mix(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

void Put64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

uint64_t Get64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

}  // namespace

void FillBlock(uint64_t block, uint64_t gen, std::span<uint8_t> out) {
  uint8_t* p = out.data();
  Put64(p, kPatternMagic);
  Put64(p + 8, block);
  Put64(p + 16, gen);
  uint64_t state = block * 0x100000001b3ULL ^ (gen << 1) ^ 0x5bd1e995ULL;
  for (uint32_t off = 24; off < kBlockSize; off += 8) Put64(p + off, Mix(state));
}

BlockContent Classify(std::span<const uint8_t> data) {
  static const std::array<uint8_t, kBlockSize> kZeros{};
  if (std::memcmp(data.data(), kZeros.data(), kBlockSize) == 0) return {BlockContent::kZero};
  if (Get64(data.data()) != kPatternMagic) return {BlockContent::kGarbage};
  const uint64_t block = Get64(data.data() + 8);
  const uint64_t gen = Get64(data.data() + 16);
  std::array<uint8_t, kBlockSize> want;
  FillBlock(block, gen, want);
  if (std::memcmp(want.data(), data.data(), kBlockSize) != 0) return {BlockContent::kGarbage};
  return {BlockContent::kValid, block, gen};
}

}  // namespace uq::power
