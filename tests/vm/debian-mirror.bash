# shellcheck shell=bash
# Sourced by install-deps and kernel-source: finds the machine's Debian 12 (bookworm) apt
# entry, so that further suites (bookworm-backports, trixie-backports) are fetched from the
# same mirror with the same key. Reads the apt configuration; never changes it.
#
#   bookworm_entry   prints "URIS<TAB>COMPONENTS<TAB>SIGNED_BY" of the first enabled `deb`
#                    entry for plain `bookworm` (deb822 *.sources first, then one-line
#                    sources.list / *.list), nothing if there is none.

readonly apt_sources_dir=/etc/apt/sources.list.d

# The deb822 form (*.sources): stanzas of "Field: value" lines separated by blank lines.
deb822_bookworm_entry() {
  awk '
    function flush() {
      if (f["types"] ~ /(^| )deb( |$)/ && f["suites"] ~ /(^| )bookworm( |$)/ &&
          tolower(f["enabled"]) != "no" && !done) {
        printf "%s\t%s\t%s\n", f["uris"], f["components"], f["signed-by"]; done = 1
      }
      split("", f); field = ""
    }
    /^[ \t]*#/ { next }                       # comment
    /^[ \t]*$/ { flush(); next }              # blank line ends a stanza
    /^[ \t]/ {                                # continuation of a multi-line field
      v = $0; gsub(/^[ \t]+|[ \t]+$/, "", v)
      if (field != "") f[field] = (f[field] == "" ? v : f[field] " " v)
      next
    }
    {
      field = tolower(substr($0, 1, index($0, ":") - 1)); v = substr($0, index($0, ":") + 1)
      gsub(/^[ \t]+|[ \t]+$/, "", v); f[field] = v
    }
    END { flush() }
  ' "$@"
}

# The one-line form (/etc/apt/sources.list, *.list):
#   deb [signed-by=/path ...] URI bookworm COMPONENTS...
oneline_bookworm_entry() {
  awk '
    /^[ \t]*deb[ \t]/ && !done {
      sub(/#.*/, ""); signed = ""
      if (match($0, /\[[^]]*\]/)) {
        opts = substr($0, RSTART + 1, RLENGTH - 2); $0 = substr($0, 1, RSTART - 1) substr($0, RSTART + RLENGTH)
        if (match(opts, /signed-by=[^ \t]+/)) signed = substr(opts, RSTART + 10, RLENGTH - 10)
      }
      if ($3 != "bookworm") next
      comps = $4; for (i = 5; i <= NF; i++) comps = comps " " $i
      printf "%s\t%s\t%s\n", $2, comps, signed; done = 1
    }
  ' "$@"
}

bookworm_entry() {
  local f entry='' deb822_files=() oneline_files=()
  for f in "$apt_sources_dir"/*.sources; do [[ -f "$f" ]] && deb822_files+=("$f"); done
  for f in /etc/apt/sources.list "$apt_sources_dir"/*.list; do [[ -f "$f" ]] && oneline_files+=("$f"); done
  ((${#deb822_files[@]})) && entry=$(deb822_bookworm_entry "${deb822_files[@]}")
  [[ -z "$entry" && ${#oneline_files[@]} -gt 0 ]] && entry=$(oneline_bookworm_entry "${oneline_files[@]}")
  [[ -n "$entry" ]] && printf '%s\n' "$entry"
  return 0
}
