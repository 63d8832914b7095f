// ProgressMeter: the progress line of `qemu-img convert -p`.
#ifndef UBLK_QCOW2_TOOLS_PROGRESS_H_
#define UBLK_QCOW2_TOOLS_PROGRESS_H_

#include <cstdint>
#include <cstdio>

namespace uq::tools {

// Draws "    (12.34/100%)\r" on `out`, like qemu-img: once at Start() (0.00),
// again whenever the percentage has grown by at least `min_step` points since
// the last drawing, and "    (100.00/100%)\n" at Finish(). Flushes each time.
// A meter with out == nullptr draws nothing.
class ProgressMeter {
 public:
  explicit ProgressMeter(std::FILE* out, double min_step = 1.0) : out_(out), min_step_(min_step) {}

  void Start();
  // `done` of `total` units finished (total 0 counts as finished).
  void Update(uint64_t done, uint64_t total);
  void Finish();
  // Draws 100% unless the line shows it already, leaving the line open (as
  // qemu-img compare does before its verdict).
  void ReachHundred();

 private:
  void Draw(double percent, char end);

  std::FILE* out_;
  double min_step_;
  double last_drawn_ = 0.0;
};

}  // namespace uq::tools

#endif  // UBLK_QCOW2_TOOLS_PROGRESS_H_
