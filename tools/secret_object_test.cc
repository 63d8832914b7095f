#include "tools/secret_object.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace uq::tools {
namespace {

std::string Text(const qcow2::crypto::SecretBytes& b) {
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}

TEST(SecretObject, DataFileAndBase64) {
  auto o = ParseSecretObject("secret,id=sec0,data=pass,,word");
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(o->id, "sec0");
  EXPECT_EQ(Text(o->value), "pass,word");  // ",," is a comma, as in QemuOpts

  o = ParseSecretObject("qom-type=secret,id=b,data=c2VjcmV0,format=base64");
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(Text(o->value), "secret");

  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string path = std::string(tmp ? tmp : "/tmp") + "/secret_object_test.key";
  FILE* f = std::fopen(path.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fputs("line one\nline two\n", f);
  std::fclose(f);
  o = ParseSecretObject("secret,id=f,file=" + path);
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(Text(o->value), "line one\nline two\n");  // whole, newline kept
  std::remove(path.c_str());
}

TEST(SecretObject, ErrorsAsQemuAndNeverTheSecret) {
  struct Case {
    const char* argument;
    const char* message;
  };
  const Case cases[] = {
      {"secret,id=s0", "Either 'file' or 'data' must be provided"},
      {"secret,id=s0,data=TOPSECRET,file=k", "'file' and 'data' are mutually exclusive"},
      {"foo,id=s0", "Parameter 'qom-type' does not accept value 'foo'"},
      {"secret,data=TOPSECRET", "Parameter 'id' is missing"},
      {"secret,id=s0,data=TOPSECRET,bogus=1", "Parameter 'bogus' is unexpected"},
      {"secret,id=s0,data=TOPSECRET,format=hex", "Parameter 'format' does not accept value 'hex'"},
      {"secret,id=s0,data=TOPSECRET,,,", "--object: invalid option list"},
      {"secret,id=s0,data=TOPSECRET,keyid=k", "encrypted secrets"},
      {"secret,id=s0,file=/nonexistent/k", "/nonexistent/k: cannot read secret file"},
      {"secret,id=s0,data=!!!!,format=base64", "not valid base64"},
  };
  for (const Case& c : cases) {
    auto o = ParseSecretObject(c.argument);
    ASSERT_FALSE(o.ok()) << c.argument;
    EXPECT_NE(o.status().message().find(c.message), std::string::npos)
        << c.argument << ": " << o.status().ToString();
    EXPECT_EQ(o.status().message().find("TOPSECRET"), std::string::npos) << c.argument;
  }
}

}  // namespace
}  // namespace uq::tools
