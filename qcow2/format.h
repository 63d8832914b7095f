// On-disk constants of the qcow2 format (QEMU's docs/interop/qcow2.rst).
// Numbers only; the structures that use them live in header.h and l2_entry.h.
#ifndef UBLK_QCOW2_QCOW2_FORMAT_H_
#define UBLK_QCOW2_QCOW2_FORMAT_H_

#include <cstdint>

namespace uq::qcow2 {

inline constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"

inline constexpr uint32_t kV2HeaderLength = 72;
inline constexpr uint32_t kV3MinHeaderLength = 104;
// header_length large enough to hold compression_type (byte 104) and padding.
inline constexpr uint32_t kV3HeaderLengthWithCompression = 112;

inline constexpr uint32_t kMinClusterBits = 9;
inline constexpr uint32_t kMaxClusterBits = 21;  // QEMU's limit: 2 MiB
inline constexpr uint32_t kMinExtendedL2ClusterBits = 14;
inline constexpr uint32_t kMaxBackingFileNameSize = 1023;
inline constexpr uint64_t kMaxL1Bytes = 32ull << 20;            // QEMU's limit
inline constexpr uint64_t kMaxRefcountTableBytes = 8ull << 20;  // QEMU's limit
inline constexpr uint32_t kMaxRefcountOrder = 6;
inline constexpr uint32_t kMaxSnapshots = 65536;

// Header extension types.
inline constexpr uint32_t kExtEnd = 0x00000000;
inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtFeatureNames = 0x6803f857;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtCrypto = 0x0537be77;
inline constexpr uint32_t kExtDataFile = 0x44415441;
inline constexpr uint32_t kFeatureNameEntrySize = 48;

// incompatible_features
inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatDataFile = 1ull << 2;
inline constexpr uint64_t kIncompatCompression = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
inline constexpr uint64_t kIncompatKnown = (1ull << 5) - 1;
// compatible_features
inline constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;
// autoclear_features
inline constexpr uint64_t kAutoclearBitmaps = 1ull << 0;
// Limits QEMU puts on the bitmaps extension (block/qcow2.h).
inline constexpr uint32_t kMaxBitmaps = 65535;
inline constexpr uint64_t kMaxBitmapDirectorySize = 1024ull * kMaxBitmaps;
// QEMU keeps the backing format name in 16 bytes, NUL included.
inline constexpr uint32_t kMaxBackingFormatSize = 15;
inline constexpr uint64_t kAutoclearDataFileRaw = 1ull << 1;
inline constexpr uint64_t kAutoclearKnown = (1ull << 2) - 1;

// Feature name table types.
inline constexpr uint8_t kFeatureIncompatible = 0;
inline constexpr uint8_t kFeatureCompatible = 1;
inline constexpr uint8_t kFeatureAutoclear = 2;

// L1 and L2 entries.
inline constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ull;  // bits 9-55
inline constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ull;  // bits 9-55
inline constexpr uint64_t kEntryCopied = 1ull << 63;
inline constexpr uint64_t kEntryCompressed = 1ull << 62;
inline constexpr uint64_t kEntryZero = 1ull << 0;
inline constexpr uint64_t kRefcountTableOffsetMask = 0xfffffffffffffe00ull;  // bits 9-63

inline constexpr uint32_t kSubclustersPerCluster = 32;
// Extended L2 bitmap: all 32 subclusters (the allocation half; << 32 for the zero half).
inline constexpr uint64_t kAllSubclusters = 0xffffffffull;
inline constexpr uint64_t kSectorSize = 512;

// compression_type
inline constexpr uint8_t kCompressionDeflate = 0;
inline constexpr uint8_t kCompressionZstd = 1;

// crypt_method
inline constexpr uint32_t kCryptNone = 0;
inline constexpr uint32_t kCryptAes = 1;
inline constexpr uint32_t kCryptLuks = 2;

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_FORMAT_H_
