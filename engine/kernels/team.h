// A decode step's threads as a team that a descheduled member cannot stall.
//
// With a barrier after every parallel region (OpenMP's), a step stops whenever the scheduler
// takes a core from one of its threads: beside one busy process on two cores, two threads ran
// at a tenth of one thread's speed. Here every member runs the same program (the
// step) and meets each region of it in order; a region's items are claimed one at a time (each
// member its own share from the front, then the others' leftovers from the back), and a member
// with nothing left to claim that has waited kTakeOverSeconds for an item another member claimed
// computes that item itself. So the team goes on while any member runs.
//
// Exactly one member's result lands: an item is computed into its member's own memory
// (`compute`), and only the member whose compare-and-swap moves the item from claimed to
// committing writes it where the next regions read it (`commit`). A member that was descheduled
// mid-item finds, when it runs again, that its item was taken over, drops its result, and skips
// every region the others have finished. Its late computation may read inputs that the later
// regions have overwritten: it never writes them anywhere, so every write of the program must
// be a commit (the code between regions computes only locals), and whatever an item reads to
// find its memory (positions, lengths) must stay the same for the whole step. `run` returns
// once every member has left the program, so nothing it refers to is freed under a late member.
//
// Region numbers grow across runs; an item's state word carries the region it was claimed in,
// so a state from an earlier region reads as free and a late member's swap on a later region's
// state fails.
#pragma once

#include <ATen/Parallel.h>
#include <pthread.h>
#include <sched.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace er {

class Team {
 public:
  static constexpr int64_t kMaxMembers = 64;
  // How long a member with nothing left to claim waits for another's claimed item before it
  // computes the item itself. An item takes 2-40 us; a descheduled thread waits milliseconds.
  static constexpr double kTakeOverSeconds = 50e-6;

  class Member;

  Team() = default;
  Team(const Team&) = delete;
  Team& operator=(const Team&) = delete;
  ~Team() {
    stopping_.store(true, std::memory_order_release);
    run_.fetch_add(1, std::memory_order_release);
    run_.notify_all();
    for (std::thread& t : workers_) t.join();
  }

  // Room for regions of up to `items` items.
  void fit(int64_t items) {
    if (items <= capacity_) return;
    states_ = std::make_unique<std::atomic<uint64_t>[]>(items);
    for (int64_t i = 0; i < items; ++i) states_[i].store(0, std::memory_order_relaxed);
    capacity_ = items;
  }

  // program(Member&) on `members` threads (the intra-op threads; 1: on this one), every member
  // the whole program. Returns when every member has returned from it.
  template <class Program>
  void run(int64_t members, Program&& program);

  // Items computed by a member other than the one that claimed them (for tests and the log).
  int64_t taken_over() const { return taken_over_.load(std::memory_order_relaxed); }

  // For tests: in the next run, member `member` sleeps `seconds` after computing item `item`
  // of the program's `region`-th region (from 1), as a descheduled thread would. Up to four.
  void stall_once(int64_t member, int64_t region, int64_t item, double seconds) {
    if (stall_count_ < static_cast<int64_t>(stalls_.size()))
      stalls_[stall_count_++] = Stall{member, region, item, seconds};
  }

 private:
  enum Status : uint64_t { kClaimed = 1, kCommitting = 2, kDone = 3 };
  static uint64_t word(uint64_t region, uint64_t status, uint64_t member) {
    return region << 8 | status << 6 | member;
  }
  static uint64_t region_of(uint64_t w) { return w >> 8; }
  static uint64_t status_of(uint64_t w) { return (w >> 6) & 3; }
  static uint64_t member_of(uint64_t w) { return w & 63; }

  // One more item done by `member`: only that member's thread writes its counter.
  void count_done(int64_t member) {
    std::atomic<uint64_t>& n = done_[member].items;
    n.store(n.load(std::memory_order_relaxed) + 1, std::memory_order_release);
  }

  // Items done since the team began, by every member that has run in it.
  uint64_t items_done() const {
    uint64_t sum = 0;
    for (int64_t m = 0; m < members_ever_; ++m) sum += done_[m].items.load(std::memory_order_acquire);
    return sum;
  }

  struct Stall {
    int64_t member = -1, region = -1, item = -1;
    double seconds = 0;
  };

  // The team's own threads (member w + 1 is worker w): OpenMP's fork and join wait for a
  // descheduled thread at every step's start and end. A worker's slot says whether it is in
  // the current run: open (it may enter), entered, or closed (the run ended without it: it has
  // nothing to catch up on). The caller closes every slot before `run` returns, and waits only
  // for a worker inside the program.
  enum Slot : uint64_t { kOpen = 1, kEntered = 2, kClosed = 3 };
  static uint64_t open(uint64_t run) { return run << 2 | kOpen; }

  void start_workers(int64_t count) {
    while (static_cast<int64_t>(workers_.size()) < count) {
      const int64_t w = static_cast<int64_t>(workers_.size());
      slots_[w].store(0, std::memory_order_relaxed);
      // from the run before this one: a worker started for a run takes part in it
      workers_.emplace_back([this, w, seen = run_.load()] { work(w, seen); });
    }
  }

  // A worker's loop: each run after `seen` that it comes to in time, as member w + 1.
  void work(int64_t w, uint64_t seen);

  // Worker w out of the current run: closed before it entered, or waited for until it leaves
  // (sleeping after a short spin, so that a descheduled worker can have this core).
  void close(int64_t w) {
    const uint64_t r = run_.load(std::memory_order_relaxed);
    uint64_t slot = open(r);
    if (slots_[w].compare_exchange_strong(slot, r << 2 | kClosed, std::memory_order_acq_rel))
      return;
    const auto since = std::chrono::steady_clock::now();
    while (slots_[w].load(std::memory_order_acquire) != (r << 2 | kClosed)) {
      if (std::chrono::steady_clock::now() - since < std::chrono::microseconds(20))
        _mm_pause();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(10));
    }
  }

  // Each worker on a CPU of its own, away from the caller's: the scheduler, left to itself,
  // kept both of a step's threads on one core beside a busy process (1.2 cores in all where
  // three threads on two cores give each 1.33). Where the caller may run on fewer CPUs than the
  // team has members, the workers go where the scheduler puts them. Placed again when the
  // caller has moved to another CPU.
  void spread(int64_t members) {
    const int here = sched_getcpu();
    if (here < 0 || here == spread_from_) return;
    spread_from_ = here;
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0 || CPU_COUNT(&allowed) < members)
      return;
    int cpu = 0;
    for (int64_t w = 0; w < members - 1; ++w) {
      while (cpu < CPU_SETSIZE && (!CPU_ISSET(cpu, &allowed) || cpu == here)) ++cpu;
      if (cpu >= CPU_SETSIZE) return;
      cpu_set_t one;
      CPU_ZERO(&one);
      CPU_SET(cpu++, &one);
      pthread_setaffinity_np(workers_[w].native_handle(), sizeof(one), &one);
    }
  }

  // A worker between runs spins this long before it sleeps: the next step comes within a
  // fraction of a millisecond, and a worker woken from sleep was placed on its waker's core.
  static constexpr std::chrono::microseconds kSpinBeforeSleep{1000};
  std::vector<std::thread> workers_;
  std::array<std::atomic<uint64_t>, kMaxMembers> slots_{};
  alignas(64) std::atomic<uint64_t> run_{0};
  std::atomic<bool> stopping_{false};
  void (*program_)(void*, Member&) = nullptr;
  void* context_ = nullptr;
  int64_t members_ = 1;
  int spread_from_ = -1;  // the caller's CPU when the workers were last placed

  std::unique_ptr<std::atomic<uint64_t>[]> states_;
  int64_t capacity_ = 0;
  // Items done since the team began, each member's on a cache line of its own (one counter
  // for all, bumped by every item, moved between the cores ~4,000 times a step): a region is
  // complete once their sum reaches the items of every region up to it, which each member
  // counts as it goes (`Member::target_`). A counter only grows, so a sum read while they move
  // is never more than the items done.
  struct alignas(64) Done {
    std::atomic<uint64_t> items{0};
  };
  std::array<Done, kMaxMembers> done_{};
  int64_t members_ever_ = 1;  // the counters that hold items
  uint64_t items_before_ = 0;  // the items of the runs before this one
  alignas(64) std::atomic<int64_t> taken_over_{0};

  uint64_t base_ = 0;  // the regions before this run's
  std::array<Stall, 4> stalls_{};
  int64_t stall_count_ = 0;
};

class Team::Member {
 public:
  Member(Team& team, int64_t id, int64_t members)
      : team_(team), id_(id), members_(members), target_(team.items_before_) {}
  int64_t id() const { return id_; }
  int64_t regions() const { return regions_; }
  uint64_t target() const { return target_; }

  // The program's next region: compute(item) for each of `items` items into this member's own
  // memory (the program's callbacks are its own member's: they know whose memory), then
  // commit(item) to write it where the next regions read it, once per item; returns when every
  // item is committed (or at once if the team is past this region).
  template <class Compute, class Commit>
  void region(int64_t items, Compute&& compute, Commit&& commit) {
    region(items, nullptr, compute, commit);
  }

  // The same with the members' shares given: member t's is [bounds[t], bounds[t + 1]) (nullptr:
  // equal counts). Each member claims its own share's items from the front, then the others'
  // from the back.
  template <class Compute, class Commit>
  void region(int64_t items, const int64_t* bounds, Compute&& compute, Commit&& commit) {
    const uint64_t r = team_.base_ + static_cast<uint64_t>(++regions_);
    if (items <= 0) return;
    target_ += static_cast<uint64_t>(items);
    if (complete()) return;
    auto share_of = [&](int64_t t) {
      return bounds ? std::pair<int64_t, int64_t>{bounds[t], bounds[t + 1]} : share(items, t);
    };
    const auto [own0, own1] = share_of(id_);
    for (int64_t i = own0; i < own1; ++i) claim(r, i, compute, commit);
    for (int64_t u = 1; u < members_; ++u) {
      const auto [o0, o1] = share_of((id_ + u) % members_);
      for (int64_t i = o1 - 1; i >= o0; --i) claim(r, i, compute, commit);
    }
    if (members_ == 1) return;
    auto since = std::chrono::steady_clock::now();
    while (!complete()) {
      if (std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count() >
          kTakeOverSeconds) {
        for (int64_t i = 0; i < items; ++i) take_over(r, i, compute, commit);
        since = std::chrono::steady_clock::now();
      }
      _mm_pause();
    }
  }

 private:
  std::pair<int64_t, int64_t> share(int64_t items, int64_t t) const {
    const int64_t chunk = (items + members_ - 1) / members_, i0 = std::min(items, t * chunk);
    return {i0, std::min(items, i0 + chunk)};
  }

  template <class Compute, class Commit>
  void claim(uint64_t r, int64_t i, Compute& compute, Commit& commit) {
    std::atomic<uint64_t>& state = team_.states_[i];
    uint64_t w = state.load(std::memory_order_acquire);
    if (region_of(w) >= r) return;
    if (state.compare_exchange_strong(w, word(r, kClaimed, id_), std::memory_order_acq_rel))
      finish(r, i, compute, commit, true);
  }

  // Another member's claimed item, claimed again by this one and finished as `claim` finishes
  // it (so that a member descheduled in turn can be taken over as well).
  template <class Compute, class Commit>
  void take_over(uint64_t r, int64_t i, Compute& compute, Commit& commit) {
    std::atomic<uint64_t>& state = team_.states_[i];
    uint64_t w = state.load(std::memory_order_acquire);
    if (region_of(w) != r || status_of(w) != kClaimed || member_of(w) == static_cast<uint64_t>(id_))
      return;
    if (state.compare_exchange_strong(w, word(r, kClaimed, id_), std::memory_order_acq_rel) &&
        finish(r, i, compute, commit, false))
      team_.taken_over_.fetch_add(1, std::memory_order_relaxed);
  }

  // Item i, claimed by this member: computed, then committed unless another member took it over
  // meanwhile (whether it was; `stallable`: the tests' stalls apply, after the computing).
  template <class Compute, class Commit>
  bool finish(uint64_t r, int64_t i, Compute& compute, Commit& commit, bool stallable) {
    compute(i);
    for (int64_t k = 0; stallable && k < team_.stall_count_; ++k) {
      const Stall& s = team_.stalls_[k];
      if (s.member == id_ && s.item == i && team_.base_ + static_cast<uint64_t>(s.region) == r)
        std::this_thread::sleep_for(std::chrono::duration<double>(s.seconds));
    }
    std::atomic<uint64_t>& state = team_.states_[i];
    uint64_t claimed = word(r, kClaimed, id_);
    if (!state.compare_exchange_strong(claimed, word(r, kCommitting, id_),
                                       std::memory_order_acq_rel))
      return false;  // taken over meanwhile: the other member's result lands
    commit(i);
    state.store(word(r, kDone, id_), std::memory_order_release);
    team_.count_done(id_);
    return true;
  }

  bool complete() const { return team_.items_done() >= target_; }

  Team& team_;
  const int64_t id_, members_;
  int64_t regions_ = 0;
  uint64_t target_;  // the items of every region so far, from the team's start
};

inline void Team::work(int64_t w, uint64_t seen) {
  for (;;) {
    // spin a little (the next step comes within a fraction of a millisecond), then sleep
    const auto since = std::chrono::steady_clock::now();
    uint64_t now = run_.load(std::memory_order_acquire);
    while (now == seen && std::chrono::steady_clock::now() - since < kSpinBeforeSleep) {
      _mm_pause();
      now = run_.load(std::memory_order_acquire);
    }
    if (now == seen) {
      run_.wait(seen, std::memory_order_acquire);
      continue;
    }
    seen = now;
    if (stopping_.load(std::memory_order_acquire)) return;
    uint64_t slot = open(now);
    if (!slots_[w].compare_exchange_strong(slot, now << 2 | kEntered, std::memory_order_acq_rel))
      continue;  // the run ended before this worker came to it
    Member m(*this, w + 1, members_);
    program_(context_, m);
    slots_[w].store(now << 2 | kClosed, std::memory_order_release);
  }
}


template <class Program>
void Team::run(int64_t members, Program&& program) {
  members = std::clamp<int64_t>(members, 1, kMaxMembers);
  Member lead(*this, 0, members);
  if (members > 1) {
    start_workers(members - 1);
    spread(members);
    program_ = [](void* p, Member& m) { (*static_cast<std::remove_reference_t<Program>*>(p))(m); };
    context_ = &program;
    members_ = members;
    members_ever_ = std::max(members_ever_, members);
    for (int64_t w = 0; w < members - 1; ++w)
      slots_[w].store(open(run_ + 1), std::memory_order_relaxed);
    run_.fetch_add(1, std::memory_order_release);
    run_.notify_all();
  }
  program(lead);
  for (int64_t w = 0; w < members - 1; ++w) close(w);
  base_ += static_cast<uint64_t>(lead.regions());
  items_before_ = lead.target();
  stall_count_ = 0;
}

}  // namespace er
