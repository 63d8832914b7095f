// ublk-qcow2: the command line. Dispatches to one verb per subcommand.
//
// Exit statuses (tools/command.h): 0 success (and --help, --version); 1 the
// verb failed, one line "ublk-qcow2: <message>" on stderr; 2 a bad command
// line (unknown verb, missing argument, bad flag or value), the message and
// the usage on stderr.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <iostream>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "tools/add_command.h"
#include "tools/bench_command.h"
#include "tools/check_command.h"
#include "tools/command.h"
#include "tools/convert_command.h"
#include "tools/create_command.h"
#include "tools/del_command.h"
#include "tools/features_command.h"
#include "tools/info_command.h"
#include "tools/list_command.h"
#include "tools/map_command.h"

namespace uq::tools {
namespace {

constexpr std::string_view kProgram = "ublk-qcow2";
constexpr std::string_view kVersion = "0.1.0";

struct Verb {
  const char* name;
  const char* summary;
  std::unique_ptr<Command> (*make)();
};

// Every verb, in the order --help lists them: image verbs, then device verbs.
constexpr Verb kVerbs[] = {
    {"create", "Create a qcow2 image (like qemu-img create -f qcow2)", &MakeCreateCommand},
    {"check", "Check (and repair) an image's reference counts (like qemu-img check)",
     &MakeCheckCommand},
    {"info", "Show an image's format, sizes, backing file and snapshots (like qemu-img info)",
     &MakeInfoCommand},
    {"map", "Show which ranges hold data or zeros, in which layer and where (like qemu-img map)",
     &MakeMapCommand},
    {"convert", "Copy an image (backing chain included) into a raw or qcow2 file",
     &MakeConvertCommand},
    {"bench", "Measure read/write IOPS on an image (like qemu-img bench)", &MakeBenchCommand},
    {"add", "Serve an image as a ublk block device /dev/ublkbN", &MakeAddCommand},
    {"del", "Stop and remove ublk devices (the image is closed cleanly)", &MakeDelCommand},
    {"list", "List ublk devices, their state, daemon and image", &MakeListCommand},
    {"features", "Show the ublk features this kernel offers and which ones add uses",
     &MakeFeaturesCommand},
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
  }

  // CLI11 would call an unknown verb an "unexpected argument"; say it plainly.
  if (argc > 1 && argv[1][0] != '-' && !IsVerb(argv[1])) {
    PrintError("unknown command '" + std::string(argv[1]) + "'");
    std::cerr << app.help();
    return kExitUsage;
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help, --version
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    PrintError(e.what());
    std::cerr << Usage(app);
    return kExitUsage;
  }

  for (size_t i = 0; i < commands.size(); ++i) {
    if (!subcommands[i]->parsed()) continue;
    Status status = commands[i]->Run();
    if (status.ok()) return commands[i]->exit_code();
    PrintError(status.ToString());
    return kExitError;
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
