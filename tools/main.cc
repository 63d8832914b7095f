// ublk-qcow2: the command line. Dispatches to one verb per subcommand.
//
// Exit statuses (tools/command.h): 0 success (and --help, --version); 1 the
// verb failed, one line "ublk-qcow2: <message>" on stderr; 2 a bad command
// line (unknown verb, missing argument, bad flag or value), the message and
// the usage on stderr. A verb may number its failures differently, as the
// qemu-img verb it follows does (compare: 1 images differ, 2..4 errors, and
// 1 for a bad command line); see Command::error_exit_code.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <exception>
#include <iostream>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "tools/add_command.h"
#include "tools/amend_command.h"
#include "tools/bench_command.h"
#include "tools/bitmap_command.h"
#include "tools/check_command.h"
#include "tools/command.h"
#include "tools/commit_command.h"
#include "tools/compare_command.h"
#include "tools/convert_command.h"
#include "tools/create_command.h"
#include "tools/del_command.h"
#include "tools/features_command.h"
#include "tools/image_key.h"
#include "tools/info_command.h"
#include "tools/list_command.h"
#include "tools/map_command.h"
#include "tools/measure_command.h"
#include "tools/rebase_command.h"
#include "tools/recover_command.h"
#include "tools/resize_command.h"
#include "tools/snapshot_command.h"
#include "tools/upgrade_command.h"

namespace uq::tools {
namespace {

constexpr std::string_view kProgram = "ublk-qcow2";
constexpr std::string_view kVersion = "0.1.0";

struct Verb {
  const char* name;
  const char* summary;
  std::unique_ptr<Command> (*make)();
  // Opens images, so takes --key-file for encrypted ones (tools/image_key.h).
  bool opens_images = true;
};

// Every verb, in the order --help lists them: image verbs, then device verbs.
constexpr Verb kVerbs[] = {
    {"create", "Create a qcow2 image (like qemu-img create -f qcow2)", &MakeCreateCommand},
    {"check", "Check (and repair) an image's reference counts (like qemu-img check)",
     &MakeCheckCommand},
    {"info", "Show an image's format, sizes, backing file and snapshots (like qemu-img info)",
     &MakeInfoCommand},
    {"compare", "Compare the guest-visible contents of two images (like qemu-img compare)",
     &MakeCompareCommand},
    {"map", "Show which ranges hold data or zeros, in which layer and where (like qemu-img map)",
     &MakeMapCommand},
    {"rebase", "Change an image's backing file, keeping what the guest sees (like qemu-img rebase)",
     &MakeRebaseCommand},
    {"commit", "Write an overlay's data into its backing file (like qemu-img commit)",
     &MakeCommitCommand},
    {"measure", "Show how large a file a new image would need (like qemu-img measure)",
     &MakeMeasureCommand},
    {"resize", "Grow or shrink an image's virtual size (like qemu-img resize)", &MakeResizeCommand},
    {"amend",
     "Change an image's options in place: compat, lazy refcounts, ... (like qemu-img amend)",
     &MakeAmendCommand},
    {"snapshot", "List, create, apply or delete internal snapshots (like qemu-img snapshot)",
     &MakeSnapshotCommand},
    {"bitmap",
     "Add, remove, clear, enable, disable or merge persistent dirty bitmaps (like "
     "qemu-img bitmap)",
     &MakeBitmapCommand},
    {"convert", "Copy an image (backing chain included) into a raw or qcow2 file",
     &MakeConvertCommand},
    {"bench", "Measure read/write IOPS on an image (like qemu-img bench)", &MakeBenchCommand},
    {"add", "Serve an image as a ublk block device /dev/ublkbN", &MakeAddCommand},
    {"del", "Stop and remove ublk devices (the image is closed cleanly)", &MakeDelCommand, false},
    {"recover", "Start a new daemon for a device whose daemon died (user recovery)",
     &MakeRecoverCommand},
    {"upgrade", "Hand a live device to a new daemon (this binary) without failing I/O",
     &MakeUpgradeCommand},
    {"list", "List ublk devices, their state, daemon and image", &MakeListCommand, false},
    {"features", "Show the ublk features this kernel offers and which ones add uses",
     &MakeFeaturesCommand, false},
};

bool IsVerb(std::string_view name) {
  for (const Verb& verb : kVerbs) {
    if (name == verb.name) return true;
  }
  return false;
}

void PrintError(std::string_view message) { std::cerr << kProgram << ": " << message << '\n'; }

// The usage of the verb being parsed (CLI11 delegates to it), or of the
// whole program.
std::string Usage(const CLI::App& app) { return app.help(); }

int Main(int argc, char** argv) {
  CLI::App app("Serve qcow2 images as Linux block devices (ublk), and inspect them.",
               std::string(kProgram));
  app.set_version_flag("--version", std::string(kProgram) + " " + std::string(kVersion));
  app.require_subcommand(1);
  app.footer(
      "Run 'ublk-qcow2 VERB --help' for a verb's flags.\n"
      "Exit status: 0 success, 1 the command failed (one line on stderr),\n"
      "2 bad command line (usage on stderr).");
  std::vector<std::unique_ptr<Command>> commands;
  std::vector<CLI::App*> subcommands;
  for (const Verb& verb : kVerbs) {
    commands.push_back(verb.make());
    subcommands.push_back(app.add_subcommand(verb.name, verb.summary));
    commands.back()->AddFlags(*subcommands.back());
    if (verb.opens_images) AddKeyFlags(*subcommands.back());
  }

  // CLI11 would call an unknown verb an "unexpected argument"; say it plainly.
  if (argc > 1 && argv[1][0] != '-' && !IsVerb(argv[1])) {
    PrintError("unknown command '" + std::string(argv[1]) + "'");
    std::cerr << app.help();
    return kExitUsage;
  }

  // CLI11 takes arguments last first. `resize IMAGE -1G`: like qemu-img,
  // the last argument is the size even when it looks like a flag.
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() >= 3 && args[0] == "resize" && args.back().size() > 1 && args.back()[0] == '-' &&
      std::isdigit(static_cast<unsigned char>(args.back()[1])) && args[args.size() - 2] != "--") {
    args.insert(args.end() - 1, "--");
  }
  std::reverse(args.begin(), args.end());

  try {
    app.parse(args);
  } catch (const CLI::Success& e) {  // --help, --version
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    PrintError(e.what());
    std::cerr << Usage(app);
    // The verb is argv[1] (an unknown one was refused above).
    for (size_t i = 0; i < commands.size(); ++i) {
      if (argc > 1 && std::string_view(argv[1]) == kVerbs[i].name) {
        return commands[i]->usage_exit_code();
      }
    }
    return kExitUsage;
  }

  if (Status key = LoadImageKey(); !key.ok()) {
    PrintError(key.ToString());
    return kExitError;
  }
  for (size_t i = 0; i < commands.size(); ++i) {
    if (!subcommands[i]->parsed()) continue;
    Status status = commands[i]->Run();
    if (status.ok()) return commands[i]->exit_code();
    PrintError(status.ToString());
    return commands[i]->error_exit_code();
  }
  std::cerr << app.help();  // unreachable: require_subcommand(1)
  return kExitUsage;
}

}  // namespace
}  // namespace uq::tools

int main(int argc, char** argv) {
  try {
    return uq::tools::Main(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ublk-qcow2: internal error: %s\n", e.what());
  } catch (...) {
    std::fprintf(stderr, "ublk-qcow2: internal error\n");
  }
  return uq::tools::kExitError;
}
