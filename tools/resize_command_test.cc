#include "tools/resize_command.h"

#include <gtest/gtest.h>

namespace uq::tools {
namespace {

uint64_t NewSize(std::string_view text, uint64_t current) {
  Result<SizeChange> change = ParseSizeChange(text);
  EXPECT_TRUE(change.ok()) << text;
  Result<uint64_t> size = change->Apply(current);
  EXPECT_TRUE(size.ok()) << text << ": " << size.status().ToString();
  return size.ok() ? *size : 0;
}

TEST(ResizeCommand, AbsoluteAndRelativeSizes) {
  EXPECT_EQ(NewSize("2G", 1 << 20), 2ull << 30);
  EXPECT_EQ(NewSize("+1M", 1 << 20), 2ull << 20);
  EXPECT_EQ(NewSize("-512K", 1 << 20), 512ull << 10);
  EXPECT_EQ(NewSize("+0", 1 << 20), 1ull << 20);
  EXPECT_EQ(NewSize("1000", 512), 1000u);  // the image refuses it, not the parser
}

TEST(ResizeCommand, SizesThatAreNotPositive) {
  for (auto [text, current] : {std::pair<const char*, uint64_t>{"0", 1 << 20},
                               {"-1M", 1 << 20},
                               {"-2M", 1 << 20},
                               {"9E", 1 << 20},
                               {"+8E", 1 << 20}}) {
    Result<SizeChange> change = ParseSizeChange(text);
    ASSERT_TRUE(change.ok()) << text;
    Result<uint64_t> size = change->Apply(current);
    ASSERT_FALSE(size.ok()) << text;
    EXPECT_EQ(size.status().message(), "New image size must be positive") << text;
  }
}

TEST(ResizeCommand, BadSizeText) {
  for (const char* text : {"", "abc", "1X", "+", "--1M", "1.5"}) {
    EXPECT_FALSE(ParseSizeChange(text).ok()) << text;
  }
}

}  // namespace
}  // namespace uq::tools
