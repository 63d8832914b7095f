#include "tools/progress.h"

namespace uq::tools {

void ProgressMeter::Start() { Draw(0.0, '\r'); }

void ProgressMeter::Update(uint64_t done, uint64_t total) {
  double percent =
      total == 0 ? 100.0 : 100.0 * static_cast<double>(done) / static_cast<double>(total);
  if (percent > 100.0) percent = 100.0;
  if (percent - last_drawn_ >= min_step_) Draw(percent, '\r');
}

void ProgressMeter::Finish() { Draw(100.0, '\n'); }

void ProgressMeter::ReachHundred() {
  if (last_drawn_ < 100.0) Draw(100.0, '\r');
}

void ProgressMeter::Draw(double percent, char end) {
  last_drawn_ = percent;
  if (out_ == nullptr) return;
  std::fprintf(out_, "    (%3.2f/100%%)%c", percent, end);
  std::fflush(out_);
}

}  // namespace uq::tools
