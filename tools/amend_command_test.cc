// ParseAmendOptions: QEMU's parsing and checks of `amend -o`, in QEMU's order.
#include "tools/amend_command.h"

#include <gtest/gtest.h>

namespace uq::tools {
namespace {

qcow2::Header V3() {
  qcow2::Header h;
  h.version = 3;
  return h;
}

std::string Error(std::string_view list, const qcow2::Header& h = V3()) {
  Result<qcow2::AmendOptions> r = ParseAmendOptions(list, h, "a.qcow2");
  return r.ok() ? "ok" : r.status().message();
}

TEST(ParseAmendOptionsTest, ReadsEachOption) {
  Result<qcow2::AmendOptions> r = ParseAmendOptions(
      "compat=v2,lazy_refcounts=off,size=8M,refcount_bits=16,data_file_raw=off", V3(), "a");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->version, 2u);
  EXPECT_EQ(r->lazy_refcounts, false);
  EXPECT_EQ(r->size, 8u << 20);
  EXPECT_EQ(r->refcount_bits, 16u);
  EXPECT_EQ(r->data_file_raw, false);
  EXPECT_FALSE(r->data_file.has_value());
  // The last value wins; a bare boolean key is on.
  r = ParseAmendOptions("compat=0.10,compat=1.1,nolazy_refcounts,lazy_refcounts", V3(), "a");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->version, 3u);
  EXPECT_EQ(r->lazy_refcounts, true);
}

TEST(ParseAmendOptionsTest, RefusesWithQemuMessages) {
  EXPECT_EQ(Error("cluster_size=4k"),
            "a.qcow2: Invalid parameter 'cluster_size' (this option is only supported for image "
            "creation)");
  // The create options do not take the whole list either: no hint.
  EXPECT_EQ(Error("cluster_size=4k,foo=1"), "a.qcow2: Invalid parameter 'cluster_size'");
  EXPECT_EQ(Error("foo=bar"), "a.qcow2: Invalid parameter 'foo'");
  EXPECT_EQ(Error("compat=2"), "a.qcow2: Unknown compatibility level 2");
  EXPECT_EQ(Error("refcount_bits=24"),
            "a.qcow2: Refcount width must be a power of two and may not exceed 64 bits");
  EXPECT_EQ(Error("data_file=x"),
            "a.qcow2: data-file can only be set for images that use an external data file");
  EXPECT_EQ(Error("data_file_raw=on"), "a.qcow2: data-file-raw cannot be set on existing images");
  EXPECT_EQ(Error("compat=0.10,refcount_bits=8"),
            "a.qcow2: Refcount widths other than 16 bits require compatibility level 1.1 or "
            "above (use compat=1.1 or greater)");
  EXPECT_EQ(Error("backing_file=b"),
            "a.qcow2: Cannot amend the backing file (you can use 'ublk-qcow2 rebase' instead)");
  EXPECT_EQ(Error("encrypt.new-secret=s"),
            "a.qcow2: Can't amend encryption options - encryption not present");
}

TEST(ParseAmendOptionsTest, JudgesInQemusOrderNotTheListsOrder) {
  // qcow2_amend_options walks its option table: compat before refcount_bits.
  EXPECT_EQ(Error("refcount_bits=3,compat=x"), "a.qcow2: Unknown compatibility level x");
  // The list is read item by item first: a bad value ends it.
  EXPECT_EQ(Error("compat=x,lazy_refcounts=maybe"),
            "a.qcow2: Parameter 'lazy_refcounts' expects 'on' or 'off'");
}

TEST(ParseAmendOptionsTest, BackingOptionsMayRepeatTheCurrentLink) {
  qcow2::Header h = V3();
  h.backing_file = "base.qcow2";
  h.backing_format = "qcow2";
  EXPECT_EQ(Error("backing_file=base.qcow2,backing_fmt=qcow2", h), "ok");
  EXPECT_NE(Error("backing_file=base.qcow2", h), "ok");
  EXPECT_NE(Error("backing_fmt=qcow2", h), "ok");
  EXPECT_NE(Error("backing_file=base.qcow2,backing_fmt=raw", h), "ok");
}

}  // namespace
}  // namespace uq::tools
