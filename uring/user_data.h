// user_data: how every SQE in ublk-qcow2 says who its completion belongs to.
//
// The 64-bit io_uring user_data is built and decoded HERE and nowhere else.
// Layout (low bits first):
//
//   bits 0..2   Kind
//   bits 3..63  kind-specific:
//     kIgnore      nothing; the completion is counted and dropped (cancel
//                  requests, wake-up NOPs). user_data == 0 is kIgnore, so a
//                  forgotten user_data never dereferences garbage.
//     kCompletion  a Completion* (objects are >= 8-byte aligned, so the
//                  pointer keeps its own value; the low bits are the kind).
//     kCommand     a 61-bit payload, e.g. a ublk (queue, tag, op) packed by
//                  CommandId. Dispatched to the ring's CommandHandler with the
//                  payload, so per-tag state can live in plain arrays.
//   Kinds 3..7 are reserved.
//
// Thread model: pure functions and interfaces; no state.
#ifndef UBLK_QCOW2_URING_USER_DATA_H_
#define UBLK_QCOW2_URING_USER_DATA_H_

#include <cassert>
#include <cstdint>

namespace uq::uring {

// Something waiting for one CQE (or, for multishot operations, several: the
// ring calls Complete once per CQE; IORING_CQE_F_MORE in `flags` says more
// will follow). Called on the ring's thread from Ring::Poll/PollNoWait.
// `res` is the raw cqe->res: >= 0 on success, -errno on failure.
// The ring does not own completions; they must outlive their operation.
class Completion {
 public:
  virtual void Complete(int32_t res, uint32_t flags) = 0;

 protected:
  ~Completion() = default;
};

// Receives completions whose user_data was built by UserData::ForCommand.
// Meant for ublk commands (FETCH_REQ / COMMIT_AND_FETCH_REQ), whose state is
// indexed by tag rather than by pointer.
class CommandHandler {
 public:
  virtual void OnCommandComplete(uint64_t payload, int32_t res, uint32_t flags) = 0;

 protected:
  ~CommandHandler() = default;
};

// A ublk-style command identity, packed into a kCommand payload as
// tag in bits 0..15, queue in bits 16..31, op in bits 32..39.
struct CommandId {
  uint16_t queue = 0;
  uint16_t tag = 0;
  uint8_t op = 0;

  constexpr uint64_t Pack() const {
    return uint64_t{tag} | (uint64_t{queue} << 16) | (uint64_t{op} << 32);
  }
  // REQUIRES: payload < 2^40 (it came from Pack()).
  static constexpr CommandId Unpack(uint64_t payload) {
    assert(payload >> 40 == 0);
    return CommandId{static_cast<uint16_t>(payload >> 16), static_cast<uint16_t>(payload),
                     static_cast<uint8_t>(payload >> 32)};
  }
  friend constexpr bool operator==(const CommandId&, const CommandId&) = default;
};

class UserData {
 public:
  enum class Kind : uint8_t { kIgnore = 0, kCompletion = 1, kCommand = 2 };
  static constexpr int kKindBits = 3;
  static constexpr uint64_t kKindMask = (uint64_t{1} << kKindBits) - 1;
  // The largest payload ForCommand accepts.
  static constexpr uint64_t kMaxPayload = ~uint64_t{0} >> kKindBits;

  static constexpr uint64_t Ignore() { return 0; }

  // REQUIRES: c != nullptr, 8-byte aligned (true of any object with a vtable).
  static uint64_t ForCompletion(Completion* c) {
    auto bits = reinterpret_cast<uintptr_t>(c);
    assert(c != nullptr && (bits & kKindMask) == 0);
    return static_cast<uint64_t>(bits) | static_cast<uint64_t>(Kind::kCompletion);
  }
  // REQUIRES: payload <= kMaxPayload.
  static constexpr uint64_t ForCommand(uint64_t payload) {
    assert(payload <= kMaxPayload);
    return (payload << kKindBits) | static_cast<uint64_t>(Kind::kCommand);
  }
  static constexpr uint64_t ForCommand(CommandId id) { return ForCommand(id.Pack()); }

  static constexpr Kind KindOf(uint64_t user_data) {
    return static_cast<Kind>(user_data & kKindMask);
  }
  // REQUIRES: KindOf(user_data) == Kind::kCompletion.
  static Completion* CompletionOf(uint64_t user_data) {
    assert(KindOf(user_data) == Kind::kCompletion);
    return reinterpret_cast<Completion*>(static_cast<uintptr_t>(user_data & ~kKindMask));
  }
  // REQUIRES: KindOf(user_data) == Kind::kCommand.
  static constexpr uint64_t PayloadOf(uint64_t user_data) {
    assert(KindOf(user_data) == Kind::kCommand);
    return user_data >> kKindBits;
  }
};

}  // namespace uq::uring

#endif  // UBLK_QCOW2_URING_USER_DATA_H_
