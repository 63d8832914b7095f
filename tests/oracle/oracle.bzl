"""oracle_test: runs one oracle script (Python 3, standard library) under sh_test."""

def oracle_test(name, script, binary, groups = [], tags = [], size = "medium", timeout = None,
                extra_data = []):
    """An sh_test that runs `script BINARY [--group G]...` with the system python3.

    Args:
      name: the test's name.
      script: read_matrix_test.py or malformed_test.py.
      binary: label of the ublk-qcow2 binary (or the stand-in script).
      groups: case groups to run (all when empty).
      tags: test tags.
      size: test size.
      timeout: test timeout (None: the size's default).
      extra_data: more files the script imports (helper modules beside oracle_lib.py).
    """
    args = ["$(location %s)" % script, "$(location %s)" % binary]
    for g in groups:
        args += ["--group", g]
    native.sh_test(
        name = name,
        srcs = ["run_python.sh"],
        args = args,
        data = [script, "oracle_lib.py", binary, "//tests/qemu:libprecise_thread_cpu.so"] +
               extra_data,
        # run() in oracle_lib.py preloads it into every qemu-img it starts (see tests/qemu/precise_thread_cpu.c).
        env = {"QEMU_PRELOAD": "$(rootpath //tests/qemu:libprecise_thread_cpu.so)"},
        size = size,
        timeout = timeout,
        tags = tags + ["oracle"],
    )
