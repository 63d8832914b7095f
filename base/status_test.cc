#include "base/status.h"

#include <gtest/gtest.h>

#include <cerrno>

namespace uq {
namespace {

Result<int> Half(int x) {
  if (x % 2) return Status::InvalidArgument("odd");
  return x / 2;
}

Status Quarter(int x, int* out) {
  ASSIGN_OR_RETURN(int h, Half(x));
  ASSIGN_OR_RETURN(*out, Half(h));
  return Status::Ok();
}

TEST(StatusTest, OkIsCheapAndPrintsOk) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.ToString(), "OK");
  EXPECT_EQ(s.ToNegativeErrno(), 0);
}

TEST(StatusTest, ErrnoMapsToCodes) {
  EXPECT_TRUE(Status::FromErrno(ENOSPC, "f").IsNoSpace());
  EXPECT_TRUE(Status::FromErrno(EAGAIN, "f").IsBusy());
  Status io = Status::FromErrno(EIO, "img.qcow2");
  EXPECT_TRUE(io.IsIoError());
  EXPECT_EQ(io.error_number(), EIO);
  EXPECT_EQ(io.ToString(), "img.qcow2: Input/output error");
}

TEST(StatusTest, CopyAndContext) {
  Status a = Status::Corruption("L2 table at 0x1000 is misaligned");
  Status b = a;
  EXPECT_TRUE(b.IsCorruption());
  EXPECT_EQ(b.WithContext("x.qcow2").ToString(), "x.qcow2: L2 table at 0x1000 is misaligned");
  EXPECT_TRUE(Status().WithContext("x").ok());
}

TEST(StatusTest, AssignOrReturnPropagates) {
  int out = 0;
  EXPECT_TRUE(Quarter(8, &out).ok());
  EXPECT_EQ(out, 2);
  EXPECT_TRUE(Quarter(6, &out).IsInvalidArgument());
}

}  // namespace
}  // namespace uq
