// CreateImage() with -o encrypt.format=luks, in memory: the options, the
// layout QEMU gives the LUKS area (checked against qemu-img by
// tests/oracle/luks_create_oracle_test.py), and that the engine opens the
// image with its passphrase only and round-trips encrypted data.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>

#include "base/endian.h"
#include "qcow2/create/create.h"
#include "qcow2/format.h"
#include "qcow2/header.h"
#include "qcow2/open_image.h"
#include "qcow2/testing/fault_injection_env.h"
#include "qcow2/testing/mem_env.h"

namespace uq::qcow2 {
namespace {

constexpr char kPath[] = "/mem/e.qcow2";

std::shared_ptr<const crypto::SecretBytes> Key(const char* text) {
  return std::make_shared<const crypto::SecretBytes>(crypto::SecretBytes::FromString(text));
}

// Options as qemu-img's -o list gives them; fixed iteration counts keep the
// test fast (timing is luks_format_test's).
Result<CreateOptions> Options(const std::string& list, const char* pass = "pw") {
  CreateOptions base;
  base.path = kPath;
  ASSIGN_OR_RETURN(CreateOptions o, ParseCreateOptions(list, base));
  if (o.encrypt) {
    o.encrypt->luks.slot_iterations = 1000;
    o.encrypt->luks.digest_iterations = 1000;
  }
  if (pass != nullptr) o.passphrase = Key(pass);
  return o;
}

Result<std::unique_ptr<BlockDevice>> Open(testing::MemEnv& env, const char* pass,
                                          bool writable = false) {
  ImageOptions io;
  io.env = &env;
  io.writable = writable;
  io.format = "qcow2";  // an empty file would probe as raw
  if (pass != nullptr) io.key = Key(pass);
  return BlockOn(OpenImage(kPath, io));
}

TEST(CreateLuksTest, ParsesEncryptOptions) {
  auto o = Options(
      "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128,"
      "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,"
      "encrypt.hash-alg=sha512,encrypt.iter-time=10");
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  ASSERT_TRUE(o->encrypt.has_value());
  EXPECT_EQ(o->encrypt->format, "luks");
  EXPECT_EQ(o->encrypt->key_secret, "sec0");
  EXPECT_EQ(o->encrypt->luks.cipher_alg, "aes-128");
  EXPECT_EQ(o->encrypt->luks.cipher_mode, "cbc");
  EXPECT_EQ(o->encrypt->luks.ivgen_alg, "essiv");
  EXPECT_EQ(o->encrypt->luks.ivgen_hash_alg, "sha256");
  EXPECT_EQ(o->encrypt->luks.hash_alg, "sha512");
  EXPECT_EQ(o->encrypt->luks.iter_time_ms, 10u);
  // QEMU's defaults.
  o = Options("encrypt.format=luks");
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->encrypt->luks.cipher_alg, "aes-256");
  EXPECT_EQ(o->encrypt->luks.cipher_mode, "xts");
  EXPECT_EQ(o->encrypt->luks.ivgen_alg, "plain64");
  EXPECT_EQ(o->encrypt->luks.hash_alg, "sha256");
  EXPECT_EQ(o->encrypt->luks.iter_time_ms, 2000u);
  // encryption=off alone is no encryption.
  o = Options("encryption=off");
  ASSERT_TRUE(o.ok());
  EXPECT_TRUE(o->encrypt->format.empty());
}

TEST(CreateLuksTest, RefusesAsQemuDoes) {
  struct Case {
    const char* list;
    const char* message;
    Code code;
  };
  using C = Code;
  const Case cases[] = {
      {"encrypt.format=foo", "Parameter 'format' does not accept value 'foo'", C::kInvalidArgument},
      {"encrypt.format=luks,encrypt.cipher-alg=foo",
       "Parameter 'cipher-alg' does not accept value 'foo'", C::kInvalidArgument},
      {"encrypt.format=luks,encrypt.cipher-mode=foo",
       "Parameter 'cipher-mode' does not accept value 'foo'", C::kInvalidArgument},
      {"encrypt.format=luks,encrypt.ivgen-alg=foo",
       "Parameter 'ivgen-alg' does not accept value 'foo'", C::kInvalidArgument},
      {"encrypt.format=luks,encrypt.hash-alg=foo",
       "Parameter 'hash-alg' does not accept value 'foo'", C::kInvalidArgument},
      {"encrypt.format=luks,encrypt.iter-time=abc",
       "Parameter 'encrypt.iter-time' expects a number", C::kInvalidArgument},
      {"encrypt.format=luks,encrypt.bogus=1", "Invalid parameter 'encrypt.bogus'",
       C::kInvalidArgument},
      {"encrypt.key-secret=s0", "Parameter 'encrypt.format' is missing", C::kInvalidArgument},
      {"encryption=off,encrypt.key-secret=s0", "Parameter 'encrypt.format' is missing",
       C::kInvalidArgument},
      {"encryption=on,encrypt.format=luks",
       "'encrypt.format' and its alias 'encryption' can't be used at the same time",
       C::kInvalidArgument},
      {"encrypt.format=luks,encryption=off",
       "'encrypt.format' and its alias 'encryption' can't be used at the same time",
       C::kInvalidArgument},
      {"encrypt.format=aes", "legacy AES-encrypted images", C::kNotSupported},
      // Debian 12's QEMU (7.2) has no SM4 in its option list.
      {"encrypt.format=luks,encrypt.cipher-alg=sm4",
       "Parameter 'cipher-alg' does not accept value 'sm4'", C::kInvalidArgument},
      // QEMU lists DES and 3DES but refuses them for LUKS; so do we.
      {"encrypt.format=luks,encrypt.cipher-alg=des", "cipher 'des' is not supported",
       C::kNotSupported},
      // CAST5's 8-byte block has no XTS (QEMU: "Unsupported cipher mode xts").
      {"encrypt.format=luks,encrypt.cipher-alg=cast5-128",
       "cipher cast5-128 in xts mode is not supported", C::kNotSupported},
      // AES has no 20-byte key for essiv to take from SHA-1; CAST5 no 32-byte.
      {"encrypt.format=luks,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha1",
       "essiv with hash 'sha1' needs a 160-bit aes key", C::kNotSupported},
      {"encrypt.format=luks,encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc,"
       "encrypt.ivgen-alg=essiv",
       "essiv with hash 'sha256' needs a 256-bit cast5 key", C::kNotSupported},
  };
  for (const Case& c : cases) {
    auto o = Options(c.list);
    ASSERT_FALSE(o.ok()) << c.list;
    EXPECT_EQ(o.status().code(), c.code) << c.list;
    EXPECT_NE(o.status().message().find(c.message), std::string::npos)
        << c.list << ": " << o.status().ToString();
  }
}

// The LUKS area goes right after the L1 table, as QEMU puts it: for 1 GiB
// with 64 KiB clusters (header, refcount table, refcount block, L1) at
// cluster 4, 2068480 bytes long, the file ending at its last cluster.
TEST(CreateLuksTest, LaysOutTheAreaAsQemu) {
  testing::MemEnv env;
  auto o = Options("encrypt.format=luks,size=1G");
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  Status st = BlockOn(CreateImage(&env, *o));
  ASSERT_TRUE(st.ok()) << st.ToString();
  const std::vector<std::byte> bytes = env.Contents(kPath);
  EXPECT_EQ(bytes.size(), 36u * 65536);
  auto h = ParseHeader(std::span(bytes).first(65536), bytes.size(), kPath, true);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->crypt_method, kCryptLuks);
  ASSERT_TRUE(h->crypto.has_value());
  EXPECT_EQ(h->crypto->offset, 4u * 65536);
  EXPECT_EQ(h->crypto->length, 2068480u);
  EXPECT_EQ(h->l1_table_offset, 3u * 65536);
  EXPECT_EQ(0, std::memcmp(bytes.data() + 4 * 65536, "LUKS\xba\xbe", 6));
}

// The engine opens the image with its passphrase only; guest data lands
// encrypted in the file and reads back.
TEST(CreateLuksTest, OpensWithThePassphraseAndRoundTrips) {
  for (const char* list : {"encrypt.format=luks,size=4M",
                           "encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,"
                           "encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1,cluster_size=512,size=4M",
                           "encrypt.format=luks,extended_l2=on,cluster_size=32k,size=4M",
                           "encrypt.format=luks,preallocation=metadata,size=4M",
                           "encrypt.format=luks,compat=0.10,size=4M",
                           // On nettle: what libcrypto lacks.
                           "encrypt.format=luks,encrypt.cipher-alg=aes-192,size=4M",
                           "encrypt.format=luks,encrypt.cipher-alg=serpent-128,size=4M",
                           "encrypt.format=luks,encrypt.cipher-alg=twofish-256,"
                           "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,size=4M",
                           "encrypt.format=luks,encrypt.cipher-alg=cast5-128,"
                           "encrypt.cipher-mode=ctr,cluster_size=4k,size=4M"}) {
    SCOPED_TRACE(list);
    testing::MemEnv env;
    auto o = Options(list, "right");
    ASSERT_TRUE(o.ok()) << o.status().ToString();
    Status st = BlockOn(CreateImage(&env, *o));
    ASSERT_TRUE(st.ok()) << st.ToString();

    auto none = Open(env, nullptr);
    EXPECT_FALSE(none.ok());
    auto wrong = Open(env, "wrong");
    ASSERT_FALSE(wrong.ok());
    EXPECT_NE(wrong.status().message().find("Invalid password, cannot unlock any keyslot"),
              std::string::npos)
        << wrong.status().ToString();

    auto dev = Open(env, "right", true);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    std::vector<std::byte> data(65536);
    for (size_t i = 0; i < data.size(); i++) data[i] = std::byte(i * 7 + 3);
    ASSERT_TRUE(BlockOn((*dev)->Write(65536, data, false)).ok());
    ASSERT_TRUE(BlockOn((*dev)->Close()).ok());
    // Not in the file in the clear.
    const std::vector<std::byte> file = env.Contents(kPath);
    EXPECT_EQ(std::search(file.begin(), file.end(), data.begin(), data.begin() + 512), file.end());

    auto again = Open(env, "right");
    ASSERT_TRUE(again.ok()) << again.status().ToString();
    std::vector<std::byte> back(65536);
    ASSERT_TRUE(BlockOn((*again)->Read(65536, back)).ok());
    EXPECT_EQ(back, data);
    ASSERT_TRUE(BlockOn((*again)->Read(0, back)).ok());
    if (std::string(list).find("preallocation") == std::string::npos) {
      EXPECT_EQ(std::count(back.begin(), back.end(), std::byte{0}), 65536);
    }
  }
}

// Without a passphrase nothing is created.
TEST(CreateLuksTest, NeedsAPassphrase) {
  testing::MemEnv env;
  auto o = Options("encrypt.format=luks,size=1M", nullptr);
  ASSERT_TRUE(o.ok());
  Status st = BlockOn(CreateImage(&env, *o));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.message(), "Parameter 'encrypt.key-secret' is required for cipher");
  EXPECT_FALSE(env.Exists(kPath));
}

}  // namespace
}  // namespace uq::qcow2

namespace uq::qcow2 {
namespace {

// A crash at any write or sync of an encrypted create leaves either no
// image (open fails, one clean error) or a whole one: it opens with the
// passphrase, reads zeros and takes a write. Never one that opens and then
// serves garbage.
TEST(CreateLuksTest, CrashAtEveryBoundary) {
  auto o = Options("encrypt.format=luks,cluster_size=4k,size=2M", "pw");
  ASSERT_TRUE(o.ok());
  uint64_t count = 0;
  {
    testing::MemEnv mem;
    testing::FaultInjectionEnv env(&mem);
    ASSERT_TRUE(BlockOn(CreateImage(&env, *o)).ok());
    count = env.operation_count();
  }
  ASSERT_GT(count, 3u);
  int whole = 0, refused = 0;
  for (uint64_t n = 0; n <= count; n++) {
    for (auto mode : {testing::CrashMode::kDropAllUnsynced, testing::CrashMode::kKeepRandomSubset,
                      testing::CrashMode::kKeepAll}) {
      SCOPED_TRACE(::testing::Message() << "crash at " << n << " mode " << int(mode));
      testing::MemEnv mem;
      testing::FaultInjectionEnv env(&mem);
      env.CrashAtOperation(n);
      Status created = BlockOn(CreateImage(&env, *o));
      EXPECT_EQ(created.ok(), n == count);
      ASSERT_TRUE(env.SimulateCrash(mode, n).ok());
      if (!mem.Exists(kPath)) {
        refused++;
        continue;
      }
      auto dev = Open(mem, "pw", true);
      if (!dev.ok()) {
        // One line, never the passphrase.
        EXPECT_EQ(dev.status().message().find('\n'), std::string::npos);
        EXPECT_EQ(dev.status().message().find("pw\""), std::string::npos);
        refused++;
        continue;
      }
      whole++;
      std::vector<std::byte> buf(8192, std::byte{1});
      ASSERT_TRUE(BlockOn((*dev)->Read(0, buf)).ok());
      EXPECT_EQ(std::count(buf.begin(), buf.end(), std::byte{0}), 8192);
      std::vector<std::byte> data(8192, std::byte{0x5a});
      ASSERT_TRUE(BlockOn((*dev)->Write(4096, data, false)).ok());
      ASSERT_TRUE(BlockOn((*dev)->Read(4096, buf)).ok());
      EXPECT_EQ(buf, data);
      ASSERT_TRUE(BlockOn((*dev)->Close()).ok());
    }
  }
  EXPECT_GT(whole, 0);
  EXPECT_GT(refused, 0);
}

}  // namespace
}  // namespace uq::qcow2
