// block_pattern: the self-describing content of every 4 KiB block the power-failure writer
// puts on the device, so that a block read back from a replayed crash state says by itself
// which block and which write (generation) it came from, and whether it is whole.
//
// Layout (little-endian): magic u64, block index u64, generation u64, then 4072 bytes of a
// pseudo-random stream seeded by (block, generation). A block is "valid" only if every byte
// equals what FillBlock would write for the block and generation its header names, so a
// block mixing two writes (torn) or sitting at the wrong offset is caught.
#ifndef UBLK_QCOW2_TESTS_POWER_BLOCK_PATTERN_H_
#define UBLK_QCOW2_TESTS_POWER_BLOCK_PATTERN_H_

#include <cstdint>
#include <span>

namespace uq::power {

inline constexpr uint32_t kBlockSize = 4096;
inline constexpr uint64_t kPatternMagic = 0x31524c505155ULL;  // "UQPLR1"

// Writes the content of (block, gen) into `out` (kBlockSize bytes).
void FillBlock(uint64_t block, uint64_t gen, std::span<uint8_t> out);

struct BlockContent {
  enum Kind { kZero, kValid, kGarbage } kind;
  uint64_t block = 0;  // from the header, kValid only
  uint64_t gen = 0;    // from the header, kValid only
};

// What `data` (kBlockSize bytes) holds.
BlockContent Classify(std::span<const uint8_t> data);

}  // namespace uq::power

#endif  // UBLK_QCOW2_TESTS_POWER_BLOCK_PATTERN_H_
