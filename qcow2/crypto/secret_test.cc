#include "qcow2/crypto/secret.h"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

namespace uq::qcow2::crypto {
namespace {

std::string Text(const SecretBytes& s) {
  return std::string(reinterpret_cast<const char*>(s.data()), s.size());
}

// The flags of the /proc/self/smaps mapping that holds `p`, or "".
std::string VmFlagsOf(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  while (std::getline(smaps, line)) {
    uintptr_t lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2 && line.find(':') > 8) {
      inside = addr >= lo && addr < hi;
    } else if (inside && line.rfind("VmFlags:", 0) == 0) {
      return line;
    }
  }
  return "";
}

TEST(SecretBytesTest, LockMovesTheBytesIntoLockedPagesOfTheirOwn) {
  SecretBytes s = SecretBytes::FromString("correct horse");
  ASSERT_FALSE(s.locked());
  if (!s.Lock()) GTEST_SKIP() << "mlock refused here (RLIMIT_MEMLOCK); nothing to check";
  EXPECT_TRUE(s.locked());
  EXPECT_EQ(Text(s), "correct horse");
  const long page = ::sysconf(_SC_PAGESIZE);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(s.data()) % page, 0u);
  const std::string flags = VmFlagsOf(s.data());
  EXPECT_NE(flags.find(" lo"), std::string::npos) << flags;  // locked
  EXPECT_NE(flags.find(" dd"), std::string::npos) << flags;  // not dumped
  EXPECT_TRUE(s.Lock());                                     // again: nothing to do

  SecretBytes moved = std::move(s);
  EXPECT_TRUE(moved.locked());
  EXPECT_EQ(Text(moved), "correct horse");
  EXPECT_TRUE(s.empty());
  moved.Clear();
  EXPECT_TRUE(moved.empty());
  EXPECT_FALSE(moved.locked());
}

TEST(SecretBytesTest, ALockRefusedByTheLimitLeavesTheBytesUsable) {
  if (::geteuid() == 0) {
    GTEST_SKIP() << "root (CAP_IPC_LOCK) is not bound by RLIMIT_MEMLOCK";
  }
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_MEMLOCK, &old), 0);
  rlimit none = old;
  none.rlim_cur = 0;
  ASSERT_EQ(::setrlimit(RLIMIT_MEMLOCK, &none), 0);
  SecretBytes s = SecretBytes::FromString("passphrase");
  const bool locked = s.Lock();
  ASSERT_EQ(::setrlimit(RLIMIT_MEMLOCK, &old), 0);
  EXPECT_FALSE(locked);
  EXPECT_FALSE(s.locked());
  EXPECT_TRUE(LockFailed());
  EXPECT_EQ(Text(s), "passphrase");
}

TEST(SecretBytesTest, ClearWipesAndMoveAssignmentReplaces) {
  SecretBytes a = SecretBytes::FromString("one");
  SecretBytes b = SecretBytes::FromString("two");
  a = std::move(b);
  EXPECT_EQ(Text(a), "two");
  a.Clear();
  EXPECT_EQ(a.size(), 0u);
  EXPECT_EQ(a.data(), nullptr);
}

}  // namespace
}  // namespace uq::qcow2::crypto
