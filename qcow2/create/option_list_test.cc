// qemu-img's -o lists and values. Expected results are qemu-img 7.2's
// (checked with `qemu-img measure -O qcow2 -o ...` and `--size`).
#include "qcow2/create/option_list.h"

#include <gtest/gtest.h>

namespace uq::qcow2 {
namespace {

TEST(OptionListTest, Splits) {
  Result<std::vector<OptionItem>> items =
      SplitOptionList("a=b,,c,lazy_refcounts,nonocow,cluster_size,x=");
  ASSERT_TRUE(items.ok());
  ASSERT_EQ(items->size(), 5u);
  EXPECT_EQ((*items)[0].key, "a");
  EXPECT_EQ((*items)[0].value, "b,c");
  EXPECT_EQ((*items)[1].value, "on");
  EXPECT_EQ((*items)[2].key, "nocow");
  EXPECT_EQ((*items)[2].value, "off");
  EXPECT_EQ((*items)[3].key, "cluster_size");
  EXPECT_EQ((*items)[3].value, "");
  EXPECT_EQ((*items)[4].value, "");
  EXPECT_TRUE(SplitOptionList("")->empty());
  EXPECT_EQ(SplitOptionList(",").status().message(), "Invalid option list: ,");
  EXPECT_EQ(SplitOptionList("a=b,").status().message(), "Invalid option list: a=b,");
}

TEST(OptionListTest, Sizes) {
  const std::pair<const char*, uint64_t> good[] = {
      {"0", 0},
      {"512", 512},
      {"1k", 1024},
      {"1.5k", 1536},
      {"2M", 2 << 20},
      {"1b", 1},
      {"0x1000", 4096},
      {" 1k", 1024},
      {"+1k", 1024},
      {"1.0", 1},
      {"7.99E", 9211842821808707338ull},
  };
  for (const auto& [text, want] : good) {
    uint64_t v = 0;
    EXPECT_EQ(ParseQemuSize(text, &v), SizeParse::kOk) << text;
    EXPECT_EQ(v, want) << text;
  }
  for (const char* text : {"", "-1", "1x", "1.5", "1.5b", "0x1.5k", "1e3", "1k ", "1kk", "0x",
                           "99999999999999999999k"}) {
    uint64_t v = 0;
    EXPECT_EQ(ParseQemuSize(text, &v), SizeParse::kSyntax) << text;
  }
  for (const char* text : {"16E", "99999999999999999999"}) {
    uint64_t v = 0;
    EXPECT_EQ(ParseQemuSize(text, &v), SizeParse::kRange) << text;
  }
  EXPECT_EQ(ParseOptionSize("cluster_size", "16E").status().message(),
            "Value '16E' is out of range for parameter 'cluster_size'");
  EXPECT_TRUE(
      ParseOptionSize("cluster_size", "abc")
          .status()
          .message()
          .starts_with("Parameter 'cluster_size' expects a non-negative number below 2^64"));
}

TEST(OptionListTest, Numbers) {
  EXPECT_EQ(*ParseOptionNumber("k", "16"), 16u);
  EXPECT_EQ(*ParseOptionNumber("k", "010"), 8u);
  EXPECT_EQ(*ParseOptionNumber("k", "0x10"), 16u);
  EXPECT_EQ(*ParseOptionNumber("k", " +16"), 16u);
  EXPECT_EQ(*ParseOptionNumber("k", "-1"), UINT64_MAX);
  EXPECT_EQ(ParseOptionNumber("k", "08").status().message(), "Parameter 'k' expects a number");
  EXPECT_EQ(ParseOptionNumber("k", "").status().message(), "Parameter 'k' expects a number");
  EXPECT_EQ(ParseOptionNumber("k", "99999999999999999999").status().message(),
            "Value '99999999999999999999' is too large for parameter 'k'");
}

TEST(OptionListTest, Booleans) {
  EXPECT_TRUE(*ParseOptionBool("b", "on"));
  EXPECT_FALSE(*ParseOptionBool("b", "off"));
  EXPECT_EQ(ParseOptionBool("b", "maybe").status().message(),
            "Parameter 'b' expects 'on' or 'off'");
}

}  // namespace
}  // namespace uq::qcow2
