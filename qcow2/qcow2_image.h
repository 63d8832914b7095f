// Qcow2Image: a qcow2 file served as a BlockDevice.
//
// Owns the image file, its external data file (if any) and its backing
// device (if any). Open() takes a header that ParseHeader() already
// validated, loads the active L1 table and the snapshot table (both bounded
// by that validation), and sets up a bounded L2 slice cache.
//
// Reads resolve each cluster (or, with extended L2, each run of subclusters)
// to one of: backing/zeros, zeros, host data, compressed data. Entries that
// contradict the spec fail the request with Corruption naming the guest
// offset and the entry; nothing is read from outside the image's own files.
//
// Writes (qcow2_write.cc) follow QEMU's ordering rules, enforced by Flush()
// (qcow2_flush.cc):
//   - data of a newly allocated cluster, and refcount increases, reach the
//     disk before the L2 entry that points at them;
//   - a new or copied L2 table reaches the disk before the L1 entry naming it;
//   - L2 entries are cleared on disk before the refcounts they held drop.
// Metadata changes stay in the caches (dirty) until a flush, a FUA write or
// Close(); data goes to the host file at once. A crash therefore loses at
// most what was written since the last completed flush, and leaves the image
// consistent (leaked clusters at worst).
//
// Stable metadata (Qcow2OpenParts::stable_metadata, the device's user
// recovery mode): a process crash keeps everything written to the file but
// loses the caches, so a write, write-zeroes or discard that left metadata
// dirty completes only once that metadata is in the file (StabilizeMetadata;
// the page cache survives, so written is enough: no sync). A full flush per
// request, or per group of requests completing together, cost 4 syncs and
// ran allocating 4 KiB writes at QD32 at 0.2-0.5x of the rate without it.
// Instead (qcow2_reserve.cc):
//   - clusters are reserved ahead in batches (8 MiB, 16-256 clusters; each
//     refill doubles it, up to 64 MiB or 2048 clusters, so that its sync is
//     shared by more allocations): their refcounts are raised to 1 and made
//     stable (blocks written, synced, then
//     the table entries naming new blocks, synced) and the file is extended
//     past them (a power cut must not leave an entry pointing past its end)
//     BEFORE any of them is handed out. Every allocation takes one;
//   - so every cluster an entry in the caches names has a stable refcount,
//     and an entry may reach the disk at any time: it is written, not
//     synced, before the acknowledgement. Requests completing together share
//     one write per run of dirty L2 slices of a table and per L1 chunk
//     (group commit); the round copies them under the metadata mutex and
//     writes them after releasing it, so allocations go on meanwhile;
//   - a new L2 table is synced (zeros, or the copy of a snapshot's table)
//     before its L1 entry is set: one sync per new table;
//   - an entry that shows bytes copied on write (a backing file's, a shared
//     or compressed cluster's, or what a reused cluster held) must not reach
//     the disk before them: the round that writes it syncs first (one sync
//     for the group). A new cluster that lay past the end of the file when
//     reserved reads as zeros on disk, so a write into a zero-reading
//     cluster needs no sync: the allocating writes of a fresh image run
//     with no sync but the refill's;
//   - references dropped (discard, write-zeroes, copy-on-write) are still
//     deferred to a flush, which syncs the entries first; past a batch's
//     worth of them a round flushes in full, so freed space comes back;
//   - refcounts dirty in memory (a compressed cluster's extra reference, an
//     allocation made outside the reserve) break the premise: the round
//     flushes in full (the old path, FlushLocked). Device requests never
//     dirty them; WriteCompressed (convert) and the quiesced operations do.
// A crash leaks the reserve, up to 64 MiB (`check -r leaks` frees it;
// qemu-img reports a leak, not corruption); a clean Close gives it back (refcounts to 0, the
// file cut after its last cluster in use). The power-loss rules above hold:
// a flush still syncs data before entries and entries before decrements.
//
// Concurrency: a guest cluster's lock is taken shared by writes into an
// allocated cluster and exclusive by anything that changes its mapping, so a
// cluster is never allocated twice; metadata mutations and flushes serialise
// on one async mutex held only for in-memory updates and for the flush.
// Writes waiting on a cluster's locks may be taken along by the request that
// allocates it, in its one write of the cluster (queued_writes.h): a
// sequential run of small writes then costs one write per cluster.
//
// Requests from other threads: mappings of allocated clusters are published
// in a SharedMap as reads and writes meet them, and TryAnyThread serves a
// read or in-place write whose clusters are all published on the calling
// thread (see shared_map.h for why that is safe). Every exclusive cluster
// lock (LockToRemap) first revokes the cluster there and waits for the
// requests using it; Close and MarkCorrupt revoke everything.
//
// Thread model: one event loop; many requests may be in flight on it.
// TryAnyThread from any thread.
#ifndef UBLK_QCOW2_QCOW2_QCOW2_IMAGE_H_
#define UBLK_QCOW2_QCOW2_QCOW2_IMAGE_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/keyed_lock.h"
#include "base/status.h"
#include "base/task.h"
#include "base/wait_list.h"
#include "qcow2/amend_options.h"
#include "qcow2/bitmap_directory.h"
#include "qcow2/bitmaps/dirty_bitmap.h"
#include "qcow2/block_device.h"
#include "qcow2/crypto/luks_volume.h"
#include "qcow2/crypto/sector_cipher.h"
#include "qcow2/file.h"
#include "qcow2/geometry.h"
#include "qcow2/header.h"
#include "qcow2/l2_entry.h"
#include "qcow2/metadata_cache.h"
#include "qcow2/preallocation.h"
#include "qcow2/queued_writes.h"
#include "qcow2/refcounts.h"
#include "qcow2/shared_map.h"
#include "qcow2/snapshot_table.h"

namespace uq::qcow2 {

struct Qcow2OpenParts {
  std::unique_ptr<File> file;
  Header header;
  std::unique_ptr<File> data_file;       // REQUIRES: set iff header.has_data_file()
  std::unique_ptr<BlockDevice> backing;  // null: no backing (reads zeros)
  bool writable = false;
  uint64_t cache_size = 32ull << 20;
  uint64_t preallocate = 0;  // ImageOptions::preallocate
  Env* env = nullptr;        // for RunOffThread and Defer; null: inline
  // Publish mappings for TryAnyThread (the top of a chain); backing files,
  // which only the engine reads, keep a one-slot SharedMap and publish nothing.
  bool publish = true;
  // Acknowledge a request that changed metadata only once that metadata is
  // in the file (see the file comment): a crash of this process then loses
  // nothing acknowledged. Costs a flush per batch of allocating writes.
  bool stable_metadata = false;
  // The unlocked LUKS area of an encrypted image (header.crypt_method 2):
  // data clusters are decrypted on reads and encrypted on writes, sector by
  // sector with their host offset's IV; compressed clusters stay plain, as
  // QEMU keeps them. Nothing is published for other threads then (they
  // would bypass the cipher).
  std::unique_ptr<crypto::LuksVolume> luks;
  // The cipher of a legacy AES-encrypted image (header.crypt_method 1,
  // crypto/legacy_aes.h): data clusters decrypted on reads with their
  // *guest* sector's IV. Such an image is opened read-only (OpenImage).
  std::unique_ptr<crypto::SectorCipher> legacy_aes;
};

// One persistent dirty bitmap as listed (Qcow2Image::bitmaps()).
struct BitmapSummary {
  std::string name;
  uint64_t granularity = 0;
  bool enabled = false;  // the "auto" flag
  bool in_use = false;   // inconsistent: found in use at open
};

class Qcow2Image final : public BlockDevice {
 public:
  static Task<Result<std::unique_ptr<Qcow2Image>>> Open(Qcow2OpenParts parts);
  // Use Open(); the constructor only assembles the parts.
  explicit Qcow2Image(Qcow2OpenParts parts);

  // QEMU serves whole 512-byte sectors: a size field that is not a multiple
  // of 512 is rounded down. Atomic: TryAnyThread reads it from other threads,
  // and Resize changes it.
  uint64_t size() const override { return size_.load(std::memory_order_acquire); }
  bool read_only() const override { return !writable_; }
  bool marked_corrupt() const override { return corrupted_; }
  const std::string& path() const override { return file_->path(); }
  Task<Status> Read(uint64_t offset, std::span<std::byte> out) override;
  Task<Status> Write(uint64_t offset, std::span<const std::byte> data, bool fua) override;
  Task<Status> Flush() override;
  Task<Status> Discard(uint64_t offset, uint64_t length) override;
  Task<Status> WriteZeroes(uint64_t offset, uint64_t length) override;
  Task<Status> Close() override;
  Task<Result<uint64_t>> ZeroPrefix(uint64_t offset, uint64_t length) override;
  // From the L1/L2 tables (block_status.cc), as QEMU's qcow2 driver answers:
  // data clusters kData at their host offset (in the data file if there is
  // one); compressed ones kData without; zero clusters kZero (with the host
  // offset if they keep one); unallocated ones kUnallocated (with the host
  // offset of their cluster for extended L2 subclusters of a mapped cluster).
  // An image whose file looks preallocated with metadata (more clusters in
  // use than the file occupies, QEMU's guess) also asks the host file: data
  // over a hole, or past the file's end, is kDataZeros.
  Task<Result<RangeStatus>> BlockStatus(uint64_t offset, uint64_t length) override;
  std::optional<Task<Status>> TryAnyThread(bool write, uint64_t offset,
                                           std::span<std::byte> buffer) override;
  // The published clusters of the range as host runs (clusters back to back
  // in the host file make one extent), pinned.
  std::optional<HostMapping> TryMapAnyThread(bool write, uint64_t offset, uint64_t length) override;

  // Writes one whole guest cluster compressed with the image's compression
  // type (the last cluster of an image may be short: the rest reads as
  // zeros). Data that does not compress is written normally, as QEMU does.
  // Compressed clusters are packed together; each host cluster they touch is
  // referenced once per compressed cluster. REQUIRES: cluster-aligned offset;
  // no external data file (the format forbids compression there).
  Task<Status> WriteCompressed(uint64_t offset, std::span<const std::byte> data);

  // Changes the virtual size to `new_size` (qcow2_resize.cc), as QEMU's
  // qcow2 driver does, leaving a consistent image after a crash at any point:
  //   grow:   a larger L1 table is written to new clusters and made stable
  //           before one header write names it together with the new size;
  //           the old table is freed after. With `prealloc` the new clusters
  //           are mapped (and reserved or zeroed in the file) before the size
  //           changes. A backing file longer than the old size would show
  //           through the new area: it is zeroed, as QEMU does.
  //   shrink: every cluster past the new end is released (its entry cleared
  //           on disk first), L2 tables wholly past it dropped from the L1,
  //           then the size written, and the file cut after its last cluster
  //           in use. A crash before the size is written may leave the old
  //           size with the released tail reading as zeros (or the backing
  //           file), as QEMU's shrink does.
  // REQUIRES: no request in flight (the caller quiesces the device).
  // Errors: InvalidArgument (not a multiple of 512, preallocation on a
  // shrink), NotSupported (snapshots in a version 2 image, persistent
  // bitmaps, whose size follows the image's and which we do not maintain),
  // NoSpace (the L1 table would pass QEMU's 32 MiB limit), I/O errors.
  Task<Status> Resize(uint64_t new_size, Preallocation prealloc) override;

  // Changes the refcount width to `bits` (1, 2, 4, 8, 16, 32 or 64), as
  // `qemu-img amend -o refcount_bits=N` does (qcow2_refcount_width.cc).
  // Everything is flushed first; the refcounts on disk are then the truth.
  // A new refcount table and blocks of the new width, counting every cluster
  // as before, themselves at 1 and the old table and blocks at 0, are
  // written past the image's last used cluster and synced; then one header
  // write (refcount_order, refcount_table_offset and refcount_table_clusters
  // share its first sector) switches to them, and is synced. A crash before
  // that leaves the old image, with unreferenced bytes past its end; after
  // it, the new one. The old structures' clusters are then discarded and the
  // file cut after its last used cluster. Same width: nothing happens.
  // REQUIRES: no request in flight (the caller quiesces the device).
  // Errors: InvalidArgument (a width that is no power of two or above 64; a
  // version 2 image, which has 16 bits only; a cluster whose refcount the
  // new width cannot hold: QEMU's "Cannot decrease refcount entry width to N
  // bits: Cluster at offset 0x... has a refcount of M"), NoSpace (the table
  // would pass QEMU's 8 MiB limit), NotSupported (read-only), I/O errors. A
  // failure of the header write or after it leaves the image read-only.
  Task<Status> SetRefcountBits(int bits);

  // --- chain verbs: rebase, commit (qcow2_chain_ops.cc) ---
  // Names `name` ("" for none) in `format` as the backing file in the header
  // (WithBackingFile's rules and errors). Everything written so far is made
  // stable first, so that data a safe rebase copied in is on disk before the
  // header stops reading it from the old backing file; then the header is
  // rewritten in one write of the first cluster and synced, as QEMU does. The
  // backing device opened with the image stays: the new link counts from the
  // next open. REQUIRES: writable image.
  Task<Status> SetBackingFile(const std::string& name, const std::optional<std::string>& format);
  // Makes the whole clusters in [offset, offset + length) unallocated (they
  // read from the backing file again, or as zeros without one) and releases
  // their host clusters, as QEMU's make_empty does after a commit; the change
  // is stable once Flush() returns. Partial clusters at the ends stay.
  Task<Status> Unallocate(uint64_t offset, uint64_t length);

  // --- amend (qcow2_amend.cc) ---
  // Changes what `options` sets, as qemu-img amend (QEMU 7.2) does: upgrade
  // to version 3 first, then the header's feature bits and data file name,
  // then the size (Resize), then a downgrade to version 2 last. Everything is
  // judged before anything is written, so a refusal leaves the image as it
  // was (QEMU refuses some of these halfway). Each step ends in one header
  // write after everything it names is stable (see qcow2_amend.cc), so a
  // crash leaves the old or the new version, both consistent.
  // Errors: InvalidArgument/NotSupported with QEMU's messages (after "<path>: "),
  // I/O errors. REQUIRES: writable image, no request in flight.
  Task<Status> Amend(const AmendOptions& options);
  // --- internal snapshots (qcow2_snapshot.cc), as QEMU's
  // block/qcow2-snapshot.c does them, each switched in by one header write:
  //   create: the snapshot keeps the active L1 table where it is; the active
  //           state gets a new L1 table naming copies of the L2 tables that
  //           had COPIED entries (flags cleared: their data is shared now)
  //           and the other L2 tables, shared; every data cluster gets one
  //           more reference.
  //   delete: the snapshot's references are dropped, and the active L2
  //           tables whose COPIED flags change (a refcount back to 1) are
  //           copied with the flags set, named by a new active L1 table.
  //   Both write every new table to new clusters and the refcount changes
  //   beside the blocks in use (Refcounts' shadow commit), sync, and switch
  //   the header to the new L1 table, snapshot table and refcount table in
  //   one write: nothing the old state uses is written before, so a crash
  //   leaves the old state or the new, with at most leaks (the new clusters
  //   before the switch, the old structures after it, until the flush that
  //   frees them). QEMU clears or sets the flags in place, which a crash
  //   leaves out of step with the refcounts (`qemu-img check` errors).
  //   apply:  the snapshot's L1 table copied to new clusters with one more
  //           reference on everything it reaches (no COPIED flags: all of it
  //           is shared with the snapshot), synced; then one header write names
  //           it as the active table with the snapshot's virtual size; then the
  //           old active tables' references are dropped. Every state on the
  //           way is consistent but for leaks.
  // REQUIRES: writable image, no request in flight.
  // Errors: NotSupported with an external data file (QEMU refuses internal
  // snapshots there); InvalidArgument when a refcount would overflow (QEMU's
  // EINVAL) or the table is full (65536 entries); Corruption for a snapshot
  // L1 table outside the file; I/O errors. Nothing is changed on disk when an
  // error comes before the header write.
  //
  // Creates a snapshot named `entry.name` with `entry`'s date, clocks and
  // vm-state size; fills in the id (the next free number, as QEMU picks it),
  // the L1 table and the disk size. Returns the new id.
  Task<Result<std::string>> CreateSnapshot(Snapshot entry);
  // Deletes snapshot `index` of snapshots().
  Task<Status> DeleteSnapshot(size_t index);
  // Makes the active state snapshot `index`'s (its data and virtual size).
  Task<Status> ApplySnapshot(size_t index);

  // --- persistent dirty bitmaps (qcow2_bitmaps.cc) ---
  // The bitmap directory is read at every open (a broken one fails Open, as
  // QEMU). Opened for writing, every enabled bitmap not found in use is
  // loaded and from then on gets the bits of every Write, WriteZeroes and
  // Discard (guest ranges rounded out to its granularity), including writes
  // served by TryAnyThread (atomic bit sets; see dirty_bitmap.h). Before the
  // first such write changes data, those bitmaps are marked in use in the
  // directory on disk (in place, synced), so a crash from then on leaves them
  // inconsistent, never wrong. Close() stores them (StoreBitmaps) and clears
  // the flag. A bitmap found in use is inconsistent: listed, never tracked,
  // refused by Clear/Enable/Merge/BitmapContents, removable. Disabled
  // bitmaps are never marked (no write changes them), unlike QEMU, which
  // marks every bitmap of an image opened read-write.
  //
  // The operations of `qemu-img bitmap` change the list in memory; Close()
  // or StoreBitmaps() writes it. Errors carry QEMU's messages, bare (no path
  // in front): InvalidArgument "Dirty bitmap 'N' not found", InvalidArgument for
  // the rest. REQUIRES: writable image, no request in flight.
  std::vector<BitmapSummary> bitmaps() const;
  // `granularity`: bytes (a power of two, 512..2 GiB); default the cluster
  // size within 4..64 KiB, as QEMU's.
  Status AddBitmap(const std::string& name, std::optional<uint64_t> granularity, bool enabled);
  Status RemoveBitmap(const std::string& name);
  Task<Status> ClearBitmap(const std::string& name);
  Task<Status> EnableBitmap(const std::string& name, bool enabled);
  // Every granule dirty in `source` becomes dirty in bitmap `name`.
  Task<Status> MergeBitmap(const std::string& name, const DirtyBitmap& source);
  // The bits of bitmap `name` (loaded from the file if need be; writable or
  // not). Reading them while writes run sees some of the newest bits.
  Task<Result<std::shared_ptr<const DirtyBitmap>>> BitmapContents(const std::string& name);
  // Writes the bitmaps (bits that changed to new clusters, a new directory),
  // flushed, then one header write names the new directory (the bitmaps
  // extension, autoclear bit 0 set; both dropped when no bitmap is left);
  // old clusters are freed after. A crash leaves the old list or the new.
  Task<Status> StoreBitmaps();
  // Runs `change` (calls of the operations above) on an image that is
  // serving (a device's `bitmap -n ID`), then stores the bitmaps, so the
  // change is on disk when this returns, even if `change` failed part way
  // (the operations before the failure took effect, as qemu-img's do). No
  // write runs on another thread meanwhile (their mappings are revoked
  // first), so none sets bits in a list that is changing, and every write
  // acknowledged before the call is in the stored bits.
  // REQUIRES: writable image, no request in flight on the image's thread.
  Task<Status> ChangeBitmapsLive(std::function<Task<Status>()> change);

  const Header& header() const { return header_; }
  const Geometry& geometry() const { return geo_; }
  const std::vector<Snapshot>& snapshots() const { return snapshots_; }
  BlockDevice* backing() const override { return backing_.get(); }
  // The image's unlocked LUKS area, or null for a plain image.
  crypto::LuksVolume* luks() const { return luks_.get(); }
  // Data clusters are encrypted (LUKS or legacy AES).
  bool encrypted() const { return luks_ != nullptr || legacy_aes_ != nullptr; }
  const MetadataCache& l2_cache() const { return l2_cache_; }
  const SharedMap& shared_map() const { return shared_map_; }
  // Guest writes that went along in another request's allocating write.
  uint64_t writes_taken_along() const { return queued_writes_.taken_total(); }
  // The refcount manager of a writable image (null when read-only).
  Refcounts* refcounts() { return refcounts_.get(); }

  // The L2 entry for the guest cluster containing `offset` (unallocated if
  // its L2 table is absent). Exposed for tests and `map`-like tools. An entry
  // QEMU refuses (RefusedEntry) is a Corruption, and marks a writable image
  // corrupt.
  Task<Result<L2Entry>> LookupEntry(uint64_t offset);

 private:
  // Reads the part of one guest cluster at [offset, offset + out.size()).
  Task<Status> ReadInCluster(uint64_t offset, std::span<std::byte> out);
  // The same, for a cluster whose L2 entry the caller already has.
  Task<Status> ReadWithEntry(const L2Entry& entry, uint64_t offset, std::span<std::byte> out);
  // Encrypted images: reads `out.size()` bytes of data at host byte `host` of
  // `f`, guest byte `guest`, and decrypts them (through a sector-aligned
  // bounce buffer when the range does not cover whole sectors).
  Task<Status> ReadDecrypted(File& f, uint64_t host, uint64_t guest, std::span<std::byte> out);
  // Encrypts or decrypts whole sectors at host byte `host` (guest byte
  // `guest`: legacy AES numbers sectors by it, LUKS by the host's) in place;
  // large buffers on a worker (Env::RunOffThread) so the image's thread goes on.
  Task<Status> RunCipher(bool encrypt, uint64_t host, uint64_t guest, std::span<std::byte> data);

  // --- write path (qcow2_write.cc) ---
  File& data_file() { return data_file_ ? *data_file_ : *file_; }
  Status CheckWritable(uint64_t offset, uint64_t length) const;
  bool WritableInPlace(const L2Entry& e, uint64_t in_cluster, uint64_t length) const;
  // `*stabilized` is set when the cluster's metadata is known to be in the
  // file on return (EntryBesideDataWrite, or a write in place into a cluster
  // whose entry is in the file), so that Write need not wait for a round;
  // left alone otherwise.
  Task<Status> WriteInCluster(uint64_t offset, std::span<const std::byte> data, bool* stabilized);
  Task<Status> AllocatingWrite(uint64_t offset, std::span<const std::byte> data, bool* stabilized);
  // Whether guest cluster `cluster`'s cached entry is in the file too (with
  // stable metadata: no round has yet to write it).
  bool EntryInFile(uint64_t cluster) const {
    return !unstable_clusters_.contains(cluster) && !writing_clusters_.contains(cluster);
  }
  // With stable metadata, whether a new cluster's entry may reach the file
  // before its data: the cluster came from the reserve reading as zeros
  // (`host_zero`, AllocateCluster's known_zero) and the window
  // [write_start, write_end) read as zeros before (`old`). A daemon crash
  // between the two then shows zeros where zeros were, and a power cut as
  // well (the entry is on disk, the unflushed data not).
  bool EntryMayPrecedeData(bool host_zero, const L2Entry& old, uint64_t write_start,
                           uint64_t write_end) const;
  // The allocating write of such a cluster: stores `updated` (naming `host`)
  // first, then writes the window with WriteWithCow while a round
  // (StabilizeMetadata) writes the entry, so the acknowledgement waits for
  // one disk write's time instead of two in series. On a failed data write
  // `old` is stored back. Sets `*stabilized` on success.
  Task<Status> EntryBesideDataWrite(uint64_t offset, const L2Entry& old, const L2Entry& updated,
                                    uint64_t host, uint64_t write_start, uint64_t write_end,
                                    std::span<const std::byte> data, bool* stabilized);
  // Extended L2: whether the cluster at `offset`, described by `e`, has no
  // host cluster yet and may get one empty (MapEmptyCluster) instead of
  // being allocated by the first write into it.
  bool MappableEmpty(const L2Entry& e) const;
  // Gives the cluster a new host cluster (with an external data file: points
  // it at its place there) with its subcluster bits unchanged (nothing
  // allocated in it yet, which reads as before). Writes then
  // allocate their subclusters side by side under the shared lock, instead
  // of all waiting for the first one's data to reach the disk.
  // REQUIRES: the cluster's exclusive lock held, its mapping revoked.
  Task<Status> MapEmptyCluster(uint64_t offset);
  // Extended L2: the cluster has its own host cluster and only unallocated or
  // zero subclusters are written: per-subcluster locking suffices.
  bool SubclusterWritable(uint64_t offset, const L2Entry& e) const;
  // Whether any subcluster of `e` (its one cluster without extended L2)
  // is invalid, e.g. allocated with no host cluster, or allocated and zero.
  bool HasInvalidSubcluster(const L2Entry& e) const;
  // Whether bytes [from, to) of the cluster mapped by `e` read as zeros
  // without reading its host cluster (zero flags, or unallocated and no
  // backing file). An empty range does.
  bool ReadsAsZeros(const L2Entry& e, uint64_t from, uint64_t to) const;
  // `me`: the write, registered by WriteInCluster.
  Task<Status> SubclusterAllocatingWrite(QueuedWrite* me);
  // Writes `data` at `in_cluster` into host cluster `host`, and around it, in
  // [write_start, write_end), what the cluster read as before (`old`; the
  // guest cluster starts at `cluster_start`), in one write of the window.
  // Queued writes of the cluster that lie inside the window go along in the
  // same write; they are returned in `taken`, for the caller to
  // QueuedWrites::Finish once the L2 entry is stored (or has failed).
  // `copied` is set if the window held bytes no write covered (copied from
  // `old`): those must be on disk before an entry showing them is.
  Task<Status> WriteWithCow(const L2Entry& old, uint64_t cluster_start, uint64_t host,
                            uint64_t write_start, uint64_t write_end, uint64_t in_cluster,
                            std::span<const std::byte> data, std::vector<QueuedWrite*>* taken,
                            bool* copied);
  // With stable metadata: a new entry whose data must be synced before the
  // entry is written (StabilizeLocked then syncs first), unless the bytes
  // copied around the guest's were zeros on a host cluster known to read as
  // zeros already (`host_zero`: AllocateCluster's known_zero). REQUIRES: the
  // metadata mutex held.
  void NoteEntryData(bool copied, bool copied_zeros, bool host_zero);
  // Makes the L2 table for `offset` exist and belong to the active L1 only.
  Task<Status> PrepareL2(uint64_t offset);
  // Stores a new entry for the cluster at `offset`. REQUIRES: PrepareL2
  // done, the metadata mutex held, and either the cluster's exclusive lock or
  // (subcluster bits only) its shared lock plus the touched subclusters' locks.
  Task<Status> StoreEntry(uint64_t offset, const L2Entry& entry);
  // Defers dropping the references `entry` holds (when it is replaced).
  void ReleaseEntry(const L2Entry& entry);
  // Defers dropping one reference to host cluster `cluster` (it is freed at
  // the next flush if that was the last). Compressed clusters stop being
  // appended to it: once free it may be handed out for data, and the bytes
  // appended after it would land on that data.
  void ReleaseCluster(uint64_t cluster);
  // The host clusters whose references `entry` holds (none in a data file).
  std::vector<uint64_t> ReferencedClusters(const L2Entry& entry) const;
  // Before replacing `entry` with a new cluster: every cluster it references
  // must have a refcount, or the new allocation could pick one of them and
  // ReleaseEntry then free the new data. Otherwise marks the image corrupt.
  Task<Status> CheckReferenced(uint64_t offset, const L2Entry& entry);
  // Makes [offset, offset + length), inside one cluster, read as zeros. A
  // `partial` range (inside one subcluster, not all of it) becomes a zeroed
  // subcluster where QEMU's rule allows, else is written as zeros.
  Task<Status> ZeroInCluster(uint64_t offset, uint64_t length, bool partial = false);
  // Drops the cluster's mapping: to the zero flag (version 3), or to
  // unallocated with `unallocate` or in a version 2 image.
  Task<Status> DiscardCluster(uint64_t offset, bool unallocate = false);
  // DiscardCluster on every whole cluster of the range (the last one also
  // when the range ends at the end of the image).
  Task<Status> DiscardWholeClusters(uint64_t offset, uint64_t length, bool unallocate);
  Task<Status> WriteZeroBuffer(uint64_t offset, uint64_t length);
  // Writes guest data at host byte `host` of the data file (encrypted first
  // for an encrypted image, with the IVs of its host sectors, so data copied
  // on write to a new cluster is re-encrypted for its new place).
  Task<Status> WriteData(uint64_t host, std::span<const std::byte> data);
  // Notes that the file now holds clusters up to `end` and, with
  // preallocation on, grows it ahead when `end` passes what was grown.
  Task<void> ExtendTo(uint64_t end);
  // Whether host cluster `host_cluster` of the image file holds metadata the
  // data path must never overwrite. REQUIRES: writable image.
  bool IsMetadataCluster(uint64_t host_cluster) const;
  // Fails with Corruption, marking the image corrupt, if a data write to
  // [host, host + length) would hit metadata.
  Task<Status> CheckNoOverlap(uint64_t host, uint64_t length);
  // Sets the corrupt bit (the image turns read-only) and returns Corruption:
  // "<path>: <why>; the image is marked corrupt and now read-only".
  // Called wherever this image's own metadata is found broken (a read or a
  // write that meets it), as QEMU's fatal corruption is: from then on
  // writes, write-zeroes and discards fail with EIO (CheckWritable), and so
  // does a flush while the caches hold metadata that can no longer be
  // written (FlushMarkedCorrupt); reads of intact clusters are still served.
  Task<Status> MarkCorrupt(std::string why);
  // The same for an error that already names the file (a Corruption from
  // Refcounts): its message, then the same ending.
  Task<Status> MarkCorrupt(Status cause);
  // One new cluster from the refcounts (with stable metadata: from the
  // reserve, refilled first if empty). A refcount structure the allocator
  // finds broken (a free-looking cluster that holds metadata, for one) marks
  // the image corrupt: writing on would destroy what it holds.
  // `known_zero` (if given) tells whether the cluster reads as zeros to the
  // guest: a reserved cluster that lay past the end of the file, in an image
  // that is not encrypted (zeros on disk decrypt to noise).
  // REQUIRES: the metadata mutex held.
  Task<Result<uint64_t>> AllocateCluster(bool* known_zero = nullptr);
  // AllocateCluster under the metadata mutex, for a cluster of its own (a
  // table or data): the file size counts it at once, and the file grows
  // into it (ExtendTo). REQUIRES: the metadata mutex not held.
  Task<Result<uint64_t>> AllocateWholeCluster(bool* known_zero = nullptr);

  // --- resize (qcow2_resize.cc) ---
  // Moves the active L1 table to new clusters with `entries` entries.
  Task<Status> GrowL1(uint64_t entries);
  // Releases every cluster in [RoundUp(new_size), size()) and the L2 tables
  // past the new end; leaves the size alone.
  Task<Status> ReleaseTail(uint64_t new_size);
  // Maps every unmapped cluster wholly inside [start, end) to a host cluster
  // of its own (1:1 in an external data file) reading zeros.
  Task<Status> PreallocateRange(uint64_t start, uint64_t end, Preallocation prealloc);
  // One cluster of PreallocateRange; a host cluster below `zero_below` is
  // written with zeros (it may hold old bytes, or full preallocation).
  // Returns the host cluster it mapped in the image file (0: none; already
  // mapped, or in a data file).
  Task<Result<uint64_t>> PreallocateCluster(uint64_t offset, uint64_t zero_below);
  // Cuts the image file after its last cluster with a nonzero refcount.
  Task<Status> TruncateAfterLastCluster();

  // --- amend (qcow2_amend.cc) ---
  // Why `options` cannot be applied (QEMU's message), or Ok.
  Task<Status> CheckAmend(const AmendOptions& options);
  // Flushes, then writes `updated` as the header and syncs it.
  Task<Status> RewriteHeader(Header updated);
  // Version 2 -> 3; the snapshot table first gets v3's extra data if needed.
  Task<Status> UpgradeToV3();
  // Version 3 -> 2: zero clusters expanded in every L2 table, then the header.
  Task<Status> DowngradeToV2();
  // Turns the zero clusters of the L2 table at `table` into what version 2
  // can hold (each table once, however many L1 tables share it).
  Task<Status> ExpandZeroClusters(uint64_t table);
  // Whether the active L1 maps any compressed cluster.
  Task<Result<bool>> HasCompressedClusters();
  // --- internal snapshots (qcow2_snapshot.cc) ---
  Status CheckSnapshotsSupported() const;
  // Snapshot `index`'s L1 table, validated and read from the file.
  Task<Result<std::vector<uint64_t>>> ReadSnapshotL1(size_t index);
  // The host clusters `l1` reaches (its L2 tables and the clusters their
  // entries reference), each as often as it is referenced.
  Task<Result<std::vector<uint64_t>>> ClustersReached(std::span<const uint64_t> l1);
  // InvalidArgument if one more reference on each of `clusters` would
  // overflow a refcount (nothing changed).
  Task<Status> CheckIncrements(const std::vector<uint64_t>& clusters);
  // One more reference on each of `clusters`, after checking that none
  // overflows (InvalidArgument, nothing changed).
  Task<Status> IncrementAll(const std::vector<uint64_t>& clusters);
  // Clears the COPIED flag of each L1 entry of `l1` and of each entry of the
  // L2 tables it names (all of it is shared). L2 changes stay dirty in the
  // cache. REQUIRES: the metadata mutex held.
  Task<Status> ClearCopiedFlags(std::span<uint64_t> l1);
  // Writes `bytes` at the start of new clusters; returns their offset (0 for
  // no bytes). REQUIRES: the metadata mutex held.
  Task<Result<uint64_t>> WriteTableClusters(std::span<const std::byte> bytes);
  // Drops a reference to each cluster of [offset, offset + bytes) (nothing
  // for offset 0).
  void ReleaseRange(uint64_t offset, uint64_t bytes);
  // Corruption unless `table`, named by L1 entry `index`, is a cluster inside
  // the file.
  Status CheckL2TableOffset(size_t index, uint64_t table) const;
  // The L2 table at `table`, whole, read through the cache.
  Task<Result<AlignedBuffer>> ReadL2Table(uint64_t table);
  // How many clusters a snapshot change over the active tables with a
  // snapshot table of `table_bytes` may allocate (Refcounts::BeginShadow).
  uint64_t ShadowReach(uint64_t table_bytes) const;
  // Runs `change` as a shadow commit of the refcounts (after a flush):
  // nothing it frees is reused before the switch, and on failure the
  // refcounts forget it and the tables it made (`made`, their clusters) are
  // no longer metadata. REQUIRES: the metadata mutex held.
  Task<Status> RunSnapshotChange(
      uint64_t table_bytes, const std::function<Task<Status>(std::vector<uint64_t>* made)>& change);
  // For each L2 table the active L1 table names (index, offset): reads it,
  // lets `rewrite` change its entries (true: some changed), writes a changed
  // table to new clusters (noted in `made`), and calls `place` with the
  // copy's offset (0: unchanged).
  Task<Status> CopyRewrittenL2Tables(
      const std::function<Task<Result<bool>>(uint64_t table, std::span<std::byte> l2)>& rewrite,
      const std::function<Task<Status>(size_t index, uint64_t table, uint64_t copy)>& place,
      std::vector<uint64_t>* made);
  // The end of a snapshot change, inside RunSnapshotChange: drops one
  // reference to each of `release`, writes `new_l1` and `table` to new
  // clusters and the refcount changes beside the blocks in use, syncs, and
  // switches the header to all of them in one write.
  Task<Status> CommitSnapshotChange(std::vector<uint64_t> new_l1, std::vector<Snapshot> table,
                                    const std::vector<uint64_t>& release,
                                    std::vector<uint64_t>* made);

  // Clusters just freed on disk (and already dropped from metadata_clusters_,
  // which must happen before the caller's next suspension): out of the L2
  // cache, and given back to the host (a failure to punch only costs space).
  Task<void> ReturnFreed(std::vector<uint64_t> freed);

  // --- cluster reserve (qcow2_reserve.cc; stable metadata only) ---
  // Whether allocations come from the reserve.
  bool Reserving() const { return stable_metadata_ && !reserve_released_; }
  // How many clusters the first refill reserves (8 MiB); later ones double
  // up to MaxReserveBatch() (64 MiB), see reserve_batch_.
  uint64_t ReserveBatch() const;
  uint64_t MaxReserveBatch() const;
  // Raises the refcounts of a batch of free clusters to 1 and makes them
  // stable (refcount blocks written, synced; the table entries naming new
  // blocks written and synced after them), then puts the clusters in
  // reserved_. On failure nothing is reserved and the clusters raised are
  // released at the next flush. REQUIRES: the metadata mutex held.
  Task<Status> RefillReserve();
  // Gives every reserved cluster back (their refcounts drop to 0 at the next
  // flush). `for_good`: no more reserving (Close).
  void ReleaseReserve(bool for_good);

  // --- flush (qcow2_flush.cc) ---
  Task<Status> FlushLocked();
  // Flush() of an image marked corrupt: EIO if metadata is still dirty (it
  // stays unwritten: the image is corrupt), else a sync of the files, for
  // data written in place before the corruption was found.
  Task<Status> FlushMarkedCorrupt();
  // Whether any metadata change waits in the caches to be written (deferred
  // decrements do not count: a process crash only leaks them).
  bool MetadataDirty() const;
  // With stable_metadata: returns once every metadata change made before the
  // call is in the file, joining a round that starts after the call or
  // running one. A round takes copies of the dirty L2 slices and L1 chunks
  // under the metadata mutex and writes them (no sync) after releasing it,
  // so allocations go on meanwhile, when the refcounts are clean; it
  // flushes in full otherwise. Rounds run one at a time (round_mutex_).
  // Clusters with entries not yet in the file are published read-only
  // (unstable_clusters_, writing_clusters_).
  // Without: Ok at once. REQUIRES: the metadata mutex not held.
  Task<Status> StabilizeMetadata();
  // What one round writes once the metadata mutex is released.
  struct L1Writes {
    std::set<uint64_t> chunks;                               // for a retry
    std::vector<std::pair<uint64_t, AlignedBuffer>> writes;  // offset, bytes
  };
  struct RoundWrites {
    bool sync_first = false;  // entries showing copied data: sync it first
    MetadataCache::Batch l2;
    L1Writes l1;
  };
  // The locked half of a round: a full flush (nothing left to write), or
  // the copies to write. REQUIRES: the metadata mutex held, no round
  // writing (round_mutex_ held).
  Task<Result<RoundWrites>> StabilizeLocked();
  // The unlocked half: writes them; on failure they are dirty again.
  Task<Status> WriteRound(RoundWrites& writes);
  // Returns once no round's writes are in flight. Whatever writes metadata
  // (FlushLocked) waits first: two writes of one slice in flight could land
  // in either order.
  Task<void> WaitRoundWrites();
  // Copies the dirty L1 chunks (and marks them clean), then writes them.
  L1Writes TakeL1Writes();
  Task<Status> WriteL1Chunks(L1Writes& l1);
  Task<Status> WriteL1();
  Task<Status> OpenForWriting();
  // --- persistent dirty bitmaps (qcow2_bitmaps.cc) ---
  struct TrackedBitmap {
    BitmapDirEntry entry;               // as it will be stored
    std::shared_ptr<DirtyBitmap> bits;  // null: not loaded
    bool changed = false;               // bits changed by an operation
    bool entry_is_new = false;          // added since the last store
    // A writable open: the table as the open read and checked it (consistent
    // bitmaps), for OpenBitmapsForWriting to use instead of reading it again,
    // which empties it.
    std::optional<std::vector<uint64_t>> table_at_open;
  };
  // Reads the directory and checks the table of every consistent bitmap
  // (ReadConsistentBitmapTables): QEMU refuses to open an image with a bad entry
  // there. A writable open keeps the tables read in table_at_open.
  Task<Status> LoadBitmapDirectory();
  // Keeps the directory, tables and data clusters out of the data path and
  // loads the bitmaps to track.
  Task<Status> OpenBitmapsForWriting();
  TrackedBitmap* FindBitmap(const std::string& name);
  Task<Result<TrackedBitmap*>> UsableBitmap(const std::string& name);
  // The bitmap table, checked as QEMU checks it (bitmap_directory.h) and with every data
  // cluster inside the file.
  Task<Result<std::vector<uint64_t>>> ReadBitmapTable(const BitmapDirEntry& e);
  // ReadBitmapTable's own check, of a table already read and checked as QEMU checks it.
  Status CheckBitmapTableInFile(const BitmapDirEntry& e, std::span<const uint64_t> table) const;
  // `table`: e's table, already read (ReadBitmapTable); null: read it here.
  Task<Result<std::shared_ptr<DirtyBitmap>>> LoadBitmapBits(
      const BitmapDirEntry& e, const std::vector<uint64_t>* table = nullptr);
  void RebuildTracking();
  // Marks the tracked bitmaps for a guest write (the first one marks them in
  // use on disk first).
  Task<Status> MarkBitmapsDirty(uint64_t offset, uint64_t length);
  // The tracked bitmaps (`every`: all bitmaps stored on disk) marked in use
  // in the directory on disk (rewritten in place and synced).
  Task<Status> MarkBitmapsInUse(bool every = false);
  // Resize's two halves for the bitmaps, which follow the virtual size as
  // QEMU's do. Before: refuses an inconsistent bitmap or one that would grow
  // past QEMU's limits, loads every bitmap and marks every stored one in use
  // on disk, so that a crash before the new size is stored leaves them
  // inconsistent, never with a table too small for the disk (which QEMU
  // refuses to open). After the header names the new size: the bits follow
  // it (the new area clean; a shrink keeps a partial last granule), stored
  // at Close.
  Task<Status> PrepareBitmapsForResize(uint64_t new_size);
  Task<void> ResizeBitmaps(uint64_t new_size);
  Task<Result<uint64_t>> WriteBitmapData(const DirtyBitmap& bits, std::vector<uint64_t>* written);
  Task<Status> ReleaseBitmapClusters(const BitmapDirEntry& e);
  bool BitmapsNeedStore() const;
  // REQUIRES: the metadata mutex held.
  Task<Status> StoreBitmapsLocked();
  // Compat downgrade: version 2 cannot hold persistent bitmaps. The
  // clusters every stored bitmap uses (directory, tables, data), as byte
  // ranges, read while the header still names them; once a header without
  // the bitmaps is stable, DropBitmaps releases them and forgets the list.
  Task<Result<std::vector<std::pair<uint64_t, uint64_t>>>> BitmapRanges();
  Task<Status> DropBitmaps(const std::vector<std::pair<uint64_t, uint64_t>>& ranges);
  Task<Status> ReadUnallocated(uint64_t offset, std::span<std::byte> out);
  Task<Result<uint64_t>> BackingZeroPrefix(uint64_t offset, uint64_t length);
  Task<Status> ReadCompressed(const L2Entry& entry, uint64_t offset_in_cluster,
                              std::span<std::byte> out);
  Status CorruptEntry(uint64_t offset, const L2Entry& entry, const char* why) const;
  // Why QEMU refuses the entry for guest `offset` outright (it fails the
  // request and marks the image corrupt), or nullptr: the zero flag in a
  // version 2 image, a host offset other than the guest offset in an
  // external data file.
  const char* RefusedEntry(uint64_t offset, const L2Entry& entry) const;

  // --- block status (block_status.cc) ---
  // What the subcluster of `e` holding guest `offset` is, in BlockStatus's
  // terms (length unset); nullopt if the entry contradicts the spec there.
  std::optional<RangeStatus> SubclusterStatus(const L2Entry& e, uint64_t offset) const;
  // `s` (data with a host offset) refined by the host file's holes and end.
  Result<RangeStatus> AskHostFile(RangeStatus s);
  // QEMU's guess whether the image was preallocated with metadata only;
  // decided once.
  Task<Result<bool>> MetadataPreallocated();

  // --- requests from other threads (shared_map.h) ---
  // Publishes the cluster at `offset` if `entry` maps all of it to data.
  // REQUIRES: `entry` is current (no suspension since it was looked up) and
  // the cluster's lock is held, or the image is read-only.
  void Publish(uint64_t offset, const L2Entry& entry);
  // Whether `entry` maps its whole guest `cluster` to data, and where
  // (writable: as the engine's own in-place write would find it, and, with
  // stable metadata, with the entry in the file). Decided once, when
  // published: new metadata (L2 tables, refcount blocks) only ever comes from
  // clusters with refcount 0, which no valid mapping points at, so a later
  // overlap could only come from an image whose refcounts already under-count
  // a mapped cluster (a corruption `check` reports).
  bool Publishable(uint64_t cluster, const L2Entry& entry, uint64_t* host, bool* writable) const;
  // Publishes every cluster of a freshly loaded L2 slice that no request
  // holds or waits for; `first_cluster` is the guest cluster of its first entry.
  void PublishSlice(const MetadataCache::SliceRef& slice, uint64_t first_cluster);
  // The cluster's exclusive lock, once no other thread uses its mapping.
  Task<KeyedLock::Guard> LockToRemap(uint64_t cluster);
  // LockToRemap's second half, for a caller that already holds the lock.
  Task<void> RevokeForRemap(uint64_t cluster);
  // Revokes every mapping of the SharedMap and waits for the requests using
  // them; `after` says whether the engine may publish again (see SharedMap).
  Task<void> RevokeShared(SharedMap::After after);
  // Waits (off this thread, through Env::RunOffThread) until no revoked
  // mapping is in use. An Env whose RunOffThread runs inline must complete
  // TryAnyThread I/O without this thread (SyncEnv does, blocking); UringEnv
  // has worker threads.
  Task<void> WaitUnpinned();
  // The I/O of a TryAnyThread request through its mapping.
  static Task<Status> ServeMapped(bool write, std::span<std::byte> buffer, HostMapping mapping);

  std::unique_ptr<File> file_;
  std::unique_ptr<File> data_file_;
  std::unique_ptr<BlockDevice> backing_;
  Header header_;
  Geometry geo_;
  std::atomic<uint64_t> size_;
  bool writable_;
  bool corrupted_ = false;  // MarkCorrupt turned this writable image read-only
  const uint64_t preallocate_;
  const bool publish_;
  const bool stable_metadata_;
  // StabilizeMetadata's group commit: requests numbered in arrival order, and
  // the highest number a completed round covers (it started after them).
  uint64_t stabilize_requests_ = 0;
  uint64_t stabilized_ = 0;
  // Held by a round from its ticket check to its last write; taken before
  // meta_mutex_, never while holding it.
  AsyncMutex round_mutex_;
  // A round's writes are in flight (meta_mutex_ released); FlushLocked
  // waits on round_io_done_.
  bool round_io_ = false;
  WaitList round_io_done_;
  // Clusters whose refcount 1 is stable and that nothing references yet,
  // handed out in ascending order (stable metadata only).
  struct Reserved {
    uint64_t host;
    bool zero;  // at or past zero_from_ when reserved: reads as zeros on disk
  };
  std::deque<Reserved> reserved_;
  // Clusters the next refill reserves (0: ReserveBatch()).
  uint64_t reserve_batch_ = 0;
  // An entry in the L2 cache shows data written since the last sync that was
  // not there before (copy-on-write): the next round syncs before writing it.
  bool entries_need_data_sync_ = false;
  // Guest clusters whose entry changed in the L2 cache and is not in the file
  // yet (stable metadata only). They are published read-only: a write served
  // on another thread is acknowledged without the engine, so it must not land
  // in a cluster that a daemon crash would unmap. Emptied once a round or a
  // flush has written every cached entry; the next lookup publishes them
  // writable again.
  std::unordered_set<uint64_t> unstable_clusters_;
  // The unstable clusters whose entries the round in flight writes (taken
  // from unstable_clusters_ under the mutex): still read-only for other
  // threads until its writes complete.
  std::unordered_set<uint64_t> writing_clusters_;
  bool reserve_released_ = false;  // Close: no more reserving
  bool reserve_extended_ = false;  // a refill grew the file (Close cuts it back)
  Env* const env_;
  uint64_t file_size_ = 0;
  // How far the file has been grown ahead (>= file_size_ once grown).
  uint64_t grown_end_ = 0;
  // From here on the file has held nothing but zeros: its size at open,
  // raised past every cluster put to use before each refill. Space grown
  // ahead (ExtendTo's fallocate, a refill's end sector) lies past it and
  // reads as zeros; a cluster below it may hold what a dead daemon or an
  // earlier owner left, whatever its refcount says now.
  uint64_t zero_from_ = 0;
  std::vector<uint64_t> l1_;
  std::vector<Snapshot> snapshots_;
  // Bitmaps: the list as it will be stored, the directory as it is on disk,
  // and the bitmaps writes mark (fixed while requests run: other threads
  // read it in TryAnyThread).
  std::vector<TrackedBitmap> bitmaps_;
  std::vector<BitmapDirEntry> disk_bitmaps_;
  std::vector<std::shared_ptr<DirtyBitmap>> tracking_;
  bool bitmaps_list_changed_ = false;
  bool bitmaps_in_use_on_disk_ = false;
  // Set once the tracked bitmaps are in use on disk: until then writes from
  // other threads go through the engine, which marks them first.
  std::atomic<bool> bitmaps_marked_in_use_{false};
  AsyncMutex bitmap_mark_mutex_;
  MetadataCache l2_cache_;
  SharedMap shared_map_;

  // Write state.
  std::unique_ptr<Refcounts> refcounts_;  // writable images only
  AsyncMutex meta_mutex_;
  KeyedLock cluster_locks_;  // by guest cluster
  KeyedLock l1_locks_;       // by L1 index
  // By guest cluster * 32 + subcluster; taken exclusively (ascending) under
  // the cluster's shared lock to change subcluster bits.
  KeyedLock subcluster_locks_;
  // Guest writes in WriteInCluster, for allocations to take along.
  QueuedWrites queued_writes_;
  std::set<uint64_t> l1_dirty_chunks_;
  // Clusters holding metadata the data path must never overwrite: header,
  // L1 table, L2 tables, snapshot table and L1s (refcount metadata is asked
  // of refcounts_).
  std::unordered_set<uint64_t> metadata_clusters_;
  bool closed_ = false;
  std::optional<bool> metadata_preallocated_;  // MetadataPreallocated()
  // Where the next compressed cluster goes (0: start a new host cluster).
  uint64_t compressed_next_ = 0;
  // The last decompressed cluster: sequential small reads of a compressed
  // cluster decompress it once.
  uint64_t decompressed_key_ = ~uint64_t{0};
  std::shared_ptr<const AlignedBuffer> decompressed_;
  // Clusters being read and decompressed, by L2 entry: concurrent reads of
  // one compressed cluster (a 2 MiB cluster read in 64 KiB requests, 32 in
  // flight) wait for the one decompression instead of each doing it.
  struct Decompression {
    WaitList done;
    Status status;
    std::shared_ptr<const AlignedBuffer> data;
  };
  std::unordered_map<uint64_t, std::shared_ptr<Decompression>> decompressing_;
  std::unique_ptr<crypto::LuksVolume> luks_;          // LUKS-encrypted images only
  std::unique_ptr<crypto::SectorCipher> legacy_aes_;  // legacy AES images only
};

}  // namespace uq::qcow2

#endif  // UBLK_QCOW2_QCOW2_QCOW2_IMAGE_H_
