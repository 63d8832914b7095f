#include "tools/progress.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <string>

namespace uq::tools {
namespace {

std::string Drawn(std::FILE* f) {
  std::fflush(f);
  std::rewind(f);
  std::string out;
  char buf[256];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
  return out;
}

TEST(ProgressMeterTest, DrawsLikeQemuImg) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  ProgressMeter meter(f);
  meter.Start();
  meter.Update(1, 1000);    // 0.1%: below the 1% step
  meter.Update(125, 1000);  // 12.5%
  meter.Update(130, 1000);  // +0.5: skipped
  meter.Update(1000, 1000);
  meter.Finish();
  EXPECT_EQ(Drawn(f), "    (0.00/100%)\r    (12.50/100%)\r    (100.00/100%)\r    (100.00/100%)\n");
  std::fclose(f);
}

TEST(ProgressMeterTest, ReachHundredDrawsOnlyWhatIsMissing) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  ProgressMeter meter(f, 2.0);
  meter.Start();
  meter.Update(990, 1000);  // 99%
  meter.Update(999, 1000);  // +0.9: below the 2-point step
  meter.ReachHundred();     // drawn: the line showed 99
  meter.ReachHundred();     // not again
  EXPECT_EQ(Drawn(f), "    (0.00/100%)\r    (99.00/100%)\r    (100.00/100%)\r");
  std::fclose(f);
}

TEST(ProgressMeterTest, SilentWithoutStream) {
  ProgressMeter meter(nullptr);
  meter.Start();
  meter.Update(5, 10);
  meter.Finish();
}

}  // namespace
}  // namespace uq::tools
