// The encodings zero copy hands the kernel (driver/zero_copy.h), against the
// numbers of the kernel's UAPI (include/uapi/linux/ublk_cmd.h, Linux 7.3).
#include "driver/zero_copy.h"

#include <gtest/gtest.h>

namespace uq::driver {
namespace {

// struct ublk_auto_buf_reg in sqe->addr: index in bits 0-15, flags in 16-23
// (UBLK_AUTO_BUF_REG_FALLBACK = 1), reserved bits zero.
TEST(ZeroCopyTest, AutoBufRegAddr) {
  EXPECT_EQ(AutoBufRegAddr(0), 0x10000u);
  EXPECT_EQ(AutoBufRegAddr(127), 0x1007fu);
  EXPECT_EQ(AutoBufRegAddr(4095), 0x10fffu);
  EXPECT_EQ(AutoBufRegAddr(4095) >> 24, 0u);
}

// pread/pwrite offset of (queue, tag): UBLKSRV_IO_BUF_OFFSET (0x80000000) +
// queue << 41 + tag << 25.
TEST(ZeroCopyTest, UserCopyOffset) {
  EXPECT_EQ(UserCopyOffset(0, 0), 0x80000000u);
  EXPECT_EQ(UserCopyOffset(0, 1), 0x80000000u + (1ull << 25));
  EXPECT_EQ(UserCopyOffset(1, 0), 0x80000000u + (1ull << 41));
  EXPECT_EQ(UserCopyOffset(3, 5), 0x80000000u + (3ull << 41) + (5ull << 25));
}

}  // namespace
}  // namespace uq::driver
