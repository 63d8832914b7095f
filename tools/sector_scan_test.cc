#include "tools/sector_scan.h"

#include <gtest/gtest.h>

#include <vector>

namespace uq::tools {
namespace {

std::vector<std::byte> Zeros(size_t n) { return std::vector<std::byte>(n); }

TEST(SectorScanTest, EqualBuffersHaveNoDifference) {
  std::vector<std::byte> a = Zeros(3 * 4096 + 100), b = a;
  a[5000] = b[5000] = std::byte{7};
  EXPECT_EQ(FirstDifferentSector(a, b), std::nullopt);
}

TEST(SectorScanTest, DifferenceIsReportedAtItsSectorStart) {
  for (size_t at : {size_t{0}, size_t{511}, size_t{512}, size_t{4095}, size_t{4096}, size_t{12387},
                    size_t{3 * 4096 + 99}}) {
    std::vector<std::byte> a = Zeros(3 * 4096 + 100), b = a;
    b[at] = std::byte{1};
    EXPECT_EQ(FirstDifferentSector(a, b), at / 512 * 512) << at;
    EXPECT_EQ(FirstNonzeroSector(b), at / 512 * 512) << at;
  }
}

TEST(SectorScanTest, FirstOfSeveralDifferencesWins) {
  std::vector<std::byte> a = Zeros(8192), b = a;
  b[7000] = std::byte{1};
  b[1030] = std::byte{2};
  EXPECT_EQ(FirstDifferentSector(a, b), 1024u);
  EXPECT_EQ(FirstNonzeroSector(b), 1024u);
}

TEST(SectorScanTest, ZerosHaveNoNonzeroSector) {
  EXPECT_EQ(FirstNonzeroSector(Zeros(10000)), std::nullopt);
  EXPECT_EQ(FirstNonzeroSector({}), std::nullopt);
}

}  // namespace
}  // namespace uq::tools
