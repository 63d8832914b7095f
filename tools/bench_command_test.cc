#include "tools/bench_command.h"

#include <gtest/gtest.h>

#include <deque>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace uq::tools {
namespace {

TEST(ParseByteCountTest, SuffixesAreBinary) {
  EXPECT_EQ(ParseByteCount("0"), 0u);
  EXPECT_EQ(ParseByteCount("4096"), 4096u);
  EXPECT_EQ(ParseByteCount("512b"), 512u);
  EXPECT_EQ(ParseByteCount("512B"), 512u);
  EXPECT_EQ(ParseByteCount("4k"), 4096u);
  EXPECT_EQ(ParseByteCount("4K"), 4096u);
  EXPECT_EQ(ParseByteCount("64M"), 64u << 20);
  EXPECT_EQ(ParseByteCount("2G"), uint64_t{2} << 30);
  EXPECT_EQ(ParseByteCount("1T"), uint64_t{1} << 40);
  EXPECT_EQ(ParseByteCount("1.5M"), 3u << 19);
  EXPECT_EQ(ParseByteCount("0.5k"), 512u);
  EXPECT_EQ(ParseByteCount("1.0"), 1u);
}

TEST(ParseByteCountTest, RejectsMalformed) {
  for (const char* bad : {"", "k", "-1", "+1", " 1", "1 ", "1x", "1kk", "1.5", "0.1k", "1.", ".5k",
                          "8E", "99999999999999999999"}) {
    EXPECT_FALSE(ParseByteCount(bad).has_value()) << bad;
  }
}

TEST(ParseUnsignedTest, BaseZeroLikeStrtoul) {
  EXPECT_EQ(ParseUnsigned("75000"), 75000u);
  EXPECT_EQ(ParseUnsigned("0x10"), 16u);
  EXPECT_EQ(ParseUnsigned("010"), 8u);
  for (const char* bad : {"", "-1", " 1", "1 ", "1k", "0x", "99999999999999999999999"}) {
    EXPECT_FALSE(ParseUnsigned(bad).has_value()) << bad;
  }
}

// Parses `args` (without the program name) as bench's subcommand flags.
BenchOptions Parse(std::vector<std::string> args) {
  CLI::App app("bench");
  BenchOptions options;
  AddBenchFlags(app, options);
  std::vector<const char*> argv = {"bench"};
  for (const std::string& arg : args) argv.push_back(arg.c_str());
  app.parse(static_cast<int>(argv.size()), argv.data());
  return options;
}

TEST(BenchFlagsTest, DefaultsAreQemuImgs) {
  BenchOptions options = Parse({"img.qcow2"});
  EXPECT_EQ(options.image, "img.qcow2");
  EXPECT_EQ(options.count, 75000u);
  EXPECT_EQ(options.depth, 64u);
  EXPECT_EQ(options.size, 4096u);
  EXPECT_EQ(options.step, 0u);
  EXPECT_EQ(options.offset, 0u);
  EXPECT_FALSE(options.write);
  EXPECT_EQ(options.pattern, 0u);
  EXPECT_EQ(options.flush_interval, 0u);
  EXPECT_TRUE(options.drain);
  EXPECT_EQ(options.cache, "writeback");
  EXPECT_EQ(options.aio, "io_uring");
  EXPECT_FALSE(options.random);
  EXPECT_EQ(options.cache_size, 32u << 20);
}

TEST(BenchFlagsTest, EveryFlag) {
  BenchOptions options = Parse({"-c",
                                "1000",
                                "-d",
                                "32",
                                "-f",
                                "qcow2",
                                "-s",
                                "64k",
                                "-S",
                                "1M",
                                "-o",
                                "4k",
                                "-w",
                                "--pattern=0xaa",
                                "--flush-interval=100",
                                "--no-drain",
                                "-t",
                                "none",
                                "-i",
                                "threads",
                                "-q",
                                "-U",
                                "--random",
                                "--seed=7",
                                "--cache-size=64M",
                                "img"});
  EXPECT_EQ(options.count, 1000u);
  EXPECT_EQ(options.depth, 32u);
  EXPECT_EQ(options.format, "qcow2");
  EXPECT_EQ(options.size, 65536u);
  EXPECT_EQ(options.step, 1u << 20);
  EXPECT_EQ(options.offset, 4096u);
  EXPECT_TRUE(options.write);
  EXPECT_EQ(options.pattern, 0xaau);
  EXPECT_EQ(options.flush_interval, 100u);
  EXPECT_FALSE(options.drain);
  EXPECT_EQ(options.cache, "none");
  EXPECT_EQ(options.aio, "threads");
  EXPECT_TRUE(options.quiet);
  EXPECT_TRUE(options.force_share);
  EXPECT_TRUE(options.random);
  EXPECT_EQ(options.seed, 7u);
  EXPECT_EQ(options.cache_size, 64u << 20);
}

TEST(BenchFlagsTest, BadValuesAreUsageErrors) {
  const std::vector<std::vector<std::string>> bad = {
      {"-c", "x", "img"},
      {"-c", "-1", "img"},
      {"-c", "4294967296", "img"},  // > INT_MAX, as qemu-img
      {"-s", "4q", "img"},
      {"--pattern=256", "img"},
      {"-t", "bogus", "img"},
      {"-i", "native", "img"},
      {"-f", "vmdk", "img"},
      {"-d", "0", "img"},
      {"-s", "0", "img"},
      {"--flush-interval=100", "img"},                   // read test
      {"-w", "-d", "64", "--flush-interval=10", "img"},  // below depth
      {},                                                // no image
  };
  for (const auto& args : bad) {
    std::string joined;
    for (const std::string& a : args) joined += a + " ";
    EXPECT_THROW(Parse(args), CLI::ParseError) << joined;
  }
}

BenchOptions Sequential(uint64_t offset, uint64_t size, uint64_t step) {
  BenchOptions options;
  options.offset = offset;
  options.size = size;
  options.step = step;
  return options;
}

std::vector<uint64_t> Take(OffsetSequence& sequence, int n) {
  std::vector<uint64_t> out;
  for (int i = 0; i < n; ++i) out.push_back(sequence.Next());
  return out;
}

TEST(OffsetSequenceTest, WalksAndWrapsLikeQemuImg) {
  OffsetSequence plain(Sequential(0, 4096, 0), 16384);
  EXPECT_EQ(Take(plain, 6), (std::vector<uint64_t>{0, 4096, 8192, 12288, 0, 4096}));

  // offset %= image_size keeps the phase...
  OffsetSequence stepped(Sequential(4096, 4096, 8192), 16384);
  EXPECT_EQ(Take(stepped, 4), (std::vector<uint64_t>{4096, 12288, 4096, 12288}));

  // ...and a request that would cross the end starts over at 0.
  OffsetSequence unaligned(Sequential(1234, 4096, 4096), 16384);
  EXPECT_EQ(Take(unaligned, 6), (std::vector<uint64_t>{1234, 5330, 9426, 0, 4096, 8192}));

  // A large step scatters requests over the image (how host.sh makes
  // qemu-img bench "random"): 7 is coprime with the 8 slots.
  OffsetSequence scattered(Sequential(0, 4096, 7 * 4096), 8 * 4096);
  std::vector<uint64_t> offsets = Take(scattered, 8);
  EXPECT_EQ(std::set<uint64_t>(offsets.begin(), offsets.end()).size(), 8u);
}

TEST(OffsetSequenceTest, FirstOffsetMustFit) {
  EXPECT_TRUE(OffsetSequence::ValidateFirstOffset(Sequential(12288, 4096, 0), 16384).ok());
  EXPECT_TRUE(
      OffsetSequence::ValidateFirstOffset(Sequential(12289, 4096, 0), 16384).IsInvalidArgument());
  EXPECT_TRUE(
      OffsetSequence::ValidateFirstOffset(Sequential(16384, 4096, 0), 16384).IsInvalidArgument());
  EXPECT_TRUE(
      OffsetSequence::ValidateFirstOffset(Sequential(0, 32768, 0), 16384).IsInvalidArgument());
}

TEST(OffsetSequenceTest, RandomIsAlignedInsideAndSeeded) {
  BenchOptions options = Sequential(4096, 4096, 0);
  options.random = true;
  const uint64_t image = 64 * 4096;
  OffsetSequence a(options, image);
  OffsetSequence b(options, image);
  options.seed = 2;
  OffsetSequence c(options, image);
  std::map<uint64_t, int> hits;
  bool differs = false;
  for (int i = 0; i < 63000; ++i) {
    const uint64_t offset = a.Next();
    EXPECT_EQ(offset, b.Next());
    differs |= offset != c.Next();
    ASSERT_EQ(offset % 4096, 0u);
    ASSERT_GE(offset, 4096u);
    ASSERT_LE(offset + 4096, image);
    ++hits[offset];
  }
  EXPECT_TRUE(differs);
  ASSERT_EQ(hits.size(), 63u);  // every slot from 4096 to the end
  for (const auto& [offset, n] : hits) {
    EXPECT_GT(n, 800) << offset;
    EXPECT_LT(n, 1200) << offset;
  }
}

// Runs a schedule with completions in order of issue; 'I' issue, 'C'
// complete, 'F' drained flush, 'U' undrained flush.
std::string Trace(uint64_t count, uint64_t depth, uint64_t interval, bool drain) {
  BenchSchedule schedule(count, depth, interval, drain);
  std::string trace;
  uint64_t max_in_flight = 0;
  for (int guard = 0; guard < 10000 && !schedule.done(); ++guard) {
    while (schedule.CanIssue()) {
      schedule.Issued();
      trace += 'I';
      max_in_flight = std::max(max_in_flight, schedule.in_flight());
    }
    if (schedule.in_flight() == 0) break;  // stuck
    trace += 'C';
    switch (schedule.Completed()) {
      case BenchSchedule::Flush::kNone:
        break;
      case BenchSchedule::Flush::kDrained:
        trace += 'F';
        EXPECT_FALSE(schedule.CanIssue());
        schedule.FlushDone();
        break;
      case BenchSchedule::Flush::kUndrained:
        trace += 'U';
        break;
    }
  }
  EXPECT_TRUE(schedule.done());
  EXPECT_LE(max_in_flight, depth);
  return trace;
}

TEST(BenchScheduleTest, KeepsDepthInFlight) {
  EXPECT_EQ(Trace(5, 2, 0, true), "IICICICICC");
  EXPECT_EQ(Trace(3, 8, 0, true), "IIICCC");
  EXPECT_EQ(Trace(0, 8, 0, true), "");
}

TEST(BenchScheduleTest, DrainedFlushWaitsForTheQueue) {
  // Flush when 4 and 0 requests are left to send, each after the requests
  // in flight complete; nothing is sent while draining.
  EXPECT_EQ(Trace(8, 2, 4, true), "IICICICCFIICICICCF");
}

TEST(BenchScheduleTest, UndrainedFlushRunsAlongside) {
  // One flush per completion that finds a multiple of 2 left to send.
  EXPECT_EQ(Trace(4, 2, 2, false), "IICUICICUCU");
}

TEST(BenchScheduleTest, PausedOnlyWhileDrainingWithWorkLeft) {
  BenchSchedule schedule(4, 2, 2, true);
  schedule.Issued();
  schedule.Issued();
  EXPECT_EQ(schedule.Completed(), BenchSchedule::Flush::kNone);  // 2 unsent: drain
  EXPECT_FALSE(schedule.CanIssue());
  EXPECT_TRUE(schedule.paused());
  EXPECT_EQ(schedule.Completed(), BenchSchedule::Flush::kDrained);
  EXPECT_TRUE(schedule.paused());
  schedule.FlushDone();
  EXPECT_FALSE(schedule.paused());
  EXPECT_TRUE(schedule.CanIssue());
}

}  // namespace
}  // namespace uq::tools
