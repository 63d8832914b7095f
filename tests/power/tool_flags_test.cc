#include "tests/power/tool_flags.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace uq::power {
namespace {

// argv as the tools get it: program, verb, then the flags.
struct Argv {
  explicit Argv(std::vector<std::string> words) : words_(std::move(words)) {
    for (std::string& w : words_) pointers_.push_back(w.data());
  }
  int argc() const { return static_cast<int>(pointers_.size()); }
  char** argv() { return pointers_.data(); }
  std::vector<std::string> words_;
  std::vector<char*> pointers_;
};

TEST(ToolFlags, ReadsPairsAfterTheVerb) {
  Argv a({"plr-replay", "plan", "--log", "x.img", "--random", "24", "--mark", "-1"});
  ToolFlags flags("plr-replay", a.argc(), a.argv());
  EXPECT_EQ(flags.Need("log"), "x.img");
  EXPECT_EQ(flags.Number("random", 0), 24u);
  EXPECT_EQ(flags.Number("seed", 7), 7u);
  EXPECT_EQ(flags.SignedNumber("mark"), -1);
  EXPECT_TRUE(flags.Has("log"));
  EXPECT_FALSE(flags.Has("seed"));
  EXPECT_EQ(flags.Get("dm", "none"), "none");
}

TEST(ToolFlags, ProblemsEndTheToolWithOneLine) {
  Argv odd({"plr-writer", "write", "--dev"});
  EXPECT_EXIT(ToolFlags("plr-writer", odd.argc(), odd.argv()), testing::ExitedWithCode(2),
              "^plr-writer: bad argument: --dev\n$");
  Argv a({"plr-replay", "apply", "--upto", "12x", "--random", "-3"});
  ToolFlags flags("plr-replay", a.argc(), a.argv());
  EXPECT_EXIT(flags.Need("log"), testing::ExitedWithCode(2), "^plr-replay: --log is required\n$");
  EXPECT_EXIT(flags.NeedNumber("upto"), testing::ExitedWithCode(2),
              "^plr-replay: --upto: not a number: 12x\n$");
  EXPECT_EXIT(flags.Number("random", 0), testing::ExitedWithCode(2),
              "^plr-replay: --random: not a number: -3\n$");
  EXPECT_EXIT(flags.NeedNumber("at-least"), testing::ExitedWithCode(2),
              "^plr-replay: --at-least is required\n$");
}

}  // namespace
}  // namespace uq::power
