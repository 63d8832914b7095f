// Rebuilding the refcount structure (QEMU's rebuild_refcount_structure),
// for when a refcount block is missing or broken: the in-memory refcounts
// are written as new refcount blocks and a new table in free clusters, then
// the header is switched to them.
#include <fmt/format.h>

#include <cassert>
#include <cstdint>
#include <utility>

#include "base/endian.h"
#include "qcow2/check/check_pass.h"
#include "qcow2/check/check_util.h"
#include "qcow2/format.h"

namespace uq::qcow2::check_internal {

Result<uint64_t> CheckPass::AllocClusters(uint64_t count, uint64_t* first_free) {
  uint64_t cluster = *first_free;
  uint64_t contiguous = 0;
  bool first_gap = true;
  for (; cluster < imrt_->size() && contiguous < count; cluster++) {
    if (imrt_->Get(cluster) == 0) {
      contiguous++;
      if (first_gap) {
        *first_free = cluster;
        first_gap = false;
      }
    } else {
      contiguous = 0;
    }
  }
  if (contiguous < count) {
    Status s = imrt_->Resize(cluster + count - contiguous);
    if (!s.ok()) return s;
  }
  cluster -= contiguous;
  for (uint64_t i = 0; i < count; i++) imrt_->Set(cluster + i, 1);
  return cluster << cb();
}

Task<Result<bool>> CheckPass::WriteRefblocks(uint64_t first, uint64_t end,
                                             std::vector<uint64_t>* table) {
  const uint32_t block_bits = cb() + 3 - h_.refcount_order;
  const uint64_t per_block = uint64_t{1} << block_bits;
  uint64_t first_free = 0;
  bool grown = false;
  for (uint64_t cluster = first; cluster < end; cluster++) {
    if (imrt_->Get(cluster) == 0) continue;
    const uint64_t index = cluster >> block_bits;
    const uint64_t start = index << block_bits;
    uint64_t block_offset;
    if (index < table->size() && (*table)[index] != 0) {
      block_offset = (*table)[index];
    } else {
      // Never place a block inside a range already written to disk.
      if (first_free < start) first_free = start;
      CO_ASSIGN_OR_RETURN(block_offset, AllocClusters(1, &first_free));
      const uint64_t block_cluster = block_offset >> cb();
      // The block that holds this block's own refcount must be written too.
      if (block_cluster >= end) end = block_cluster + 1;
      if (table->size() <= index) {
        const uint64_t entries = RoundUp((index + 1) * 8, cs()) / 8;
        if (entries * 8 > kMaxRefcountTableBytes) {
          co_return Status::NoSpace(fmt::format("the rebuilt refcount table would exceed {} bytes",
                                                kMaxRefcountTableBytes));
        }
        table->resize(entries, 0);
        grown = true;
      }
      (*table)[index] = block_offset;
    }
    CO_RETURN_IF_ERROR(co_await file_.Write(block_offset, imrt_->Block(index)));
    cluster = start + per_block - 1;  // this block is done
  }
  co_return grown;
}

Task<Status> CheckPass::RebuildRefcountStructure() {
  std::vector<uint64_t> table;
  CO_ASSIGN_OR_RETURN(bool grown, co_await WriteRefblocks(0, imrt_->size(), &table));
  assert(grown);
  uint64_t table_offset = 0;
  uint64_t table_clusters = 0;
  do {
    uint64_t first_free = 0;
    table_clusters = DivRoundUp(table.size() * 8, cs());
    CO_ASSIGN_OR_RETURN(table_offset, AllocClusters(table_clusters, &first_free));
    const uint64_t start = table_offset >> cb();
    CO_ASSIGN_OR_RETURN(grown, co_await WriteRefblocks(start, start + table_clusters, &table));
  } while (grown);

  std::vector<std::byte> bytes(table_clusters * cs());
  for (size_t i = 0; i < table.size(); i++) StoreBE64(bytes, i * 8, table[i]);
  CO_RETURN_IF_ERROR(co_await file_.Write(table_offset, bytes));
  CO_RETURN_IF_ERROR(co_await file_.Sync());
  std::byte header[12];
  StoreBE64(header, 0, table_offset);
  StoreBE32(header, 8, static_cast<uint32_t>(table_clusters));
  CO_RETURN_IF_ERROR(co_await file_.Write(kOffRefcountTableOffset, header));
  CO_RETURN_IF_ERROR(co_await file_.Sync());

  h_.refcount_table_offset = table_offset;
  h_.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
  stored_->SetTable(std::move(table));
  CO_ASSIGN_OR_RETURN(file_size_, file_.Size());
  co_return Status::Ok();
}

}  // namespace uq::qcow2::check_internal
