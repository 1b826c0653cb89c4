#!/usr/bin/env bash
# Install or upgrade the Custom SLM Appliance from its signed offline installer.
#
#   install.sh --public-key PUB.pem [--signature SIG] [--root DIR] appliance-installer-V.tar
#   install.sh --rollback [--root DIR]
#
# 1. Copies the tarball (read once) into a private directory and verifies that copy's
#    detached signature with the system openssl against the public key the operator
#    names; on any failure it stops before creating anything, --root DIR included.
# 2. Installs the software into /opt/appliance/versions/V/venv with pip --no-index from
#    the tarball's wheelhouse (no network), then points /opt/appliance/current at it and
#    keeps the version it replaces as /opt/appliance/previous (`--rollback` swaps back).
# 3. Creates the service user and directories, installs the systemd units, and trusts the
#    release-signing keys that came in the tarball.
# --root DIR does all of this inside DIR, without root privileges (tests, staging).
# Running it again with the same tarball changes nothing.
set -euo pipefail
umask 022

die() { echo "install.sh: error: $1" >&2; exit "${2:-1}"; }
say() { echo "install.sh: $*"; }

ROOT=/ PUBKEY="" SIGNATURE="" TARBALL="" ROLLBACK=0 PYTHON=${PYTHON:-python3}
while [ $# -gt 0 ]; do
    case "$1" in
        --public-key) PUBKEY=${2:?}; shift 2 ;;
        --signature) SIGNATURE=${2:?}; shift 2 ;;
        --root) ROOT=${2:?}; shift 2 ;;
        --rollback) ROLLBACK=1; shift ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" 2 ;;
        *) [ -z "$TARBALL" ] || die "only one tarball, please" 2; TARBALL=$1; shift ;;
    esac
done
OPT=""
SYSTEM_INSTALL=0
# Resolve --root, creating it only when asked to (after the signature check).
resolve_root() {
    if [ "${1:-}" = create ]; then mkdir -p -- "$ROOT"; fi
    local resolved
    resolved=$(CDPATH='' cd -- "$ROOT" && pwd) || return 1
    ROOT=$resolved
    OPT="${ROOT%/}/opt/appliance"
    if [ "$ROOT" = / ] && [ "$(id -u)" = 0 ]; then SYSTEM_INSTALL=1; fi
}

if [ "$ROLLBACK" = 1 ]; then
    resolve_root 2>/dev/null || die "no previous software version to roll back to" 3
    previous=$(readlink "$OPT/previous" 2>/dev/null) || die "no previous software version to roll back to" 3
    current=$(readlink "$OPT/current")
    ln -sfn "$previous" "$OPT/current.new" && mv -T "$OPT/current.new" "$OPT/current"
    ln -sfn "$current" "$OPT/previous.new" && mv -T "$OPT/previous.new" "$OPT/previous"
    say "software rolled back: current -> $previous (previous -> $current)"
    [ "$SYSTEM_INSTALL" = 1 ] && command -v systemctl >/dev/null && systemctl try-restart appliance.service || true
    exit 0
fi

[ -n "$TARBALL" ] || die "name the installer tarball (see --help)" 2
[ -n "$PUBKEY" ] || die "name the public key to verify it with: --public-key PUB.pem" 2
SIGNATURE=${SIGNATURE:-$TARBALL.sig}
for f in "$TARBALL" "$SIGNATURE" "$PUBKEY"; do [ -r "$f" ] || die "cannot read $f" 16; done
command -v openssl >/dev/null || die "openssl is required to verify the installer" 16

# 1. Read each input exactly once into a private directory, then verify and extract that
#    copy only: a second read of the operator's path (a FIFO, or a file swapped after
#    openssl exits) could hand tar other bytes than the ones openssl verified.
WORK=$(mktemp -d) || die "cannot create a private working directory" 16
trap 'rm -rf "$WORK"' EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM
[ -d "$WORK" ] && [ ! -L "$WORK" ] && [ "$(stat -c '%u %a' "$WORK")" = "$(id -u) 700" ] \
    || die "$WORK is not a private directory (owner $(id -u), mode 0700)" 16
# Nobody else may rename it away and put theirs in its place: a sticky or private parent.
parent_mode=$((8#$(stat -c '%a' "$(dirname "$WORK")")))
(( (parent_mode & 01000) || !(parent_mode & 022) )) \
    || die "$(dirname "$WORK") is writable by others and not sticky; set TMPDIR" 16
# Redirections, not arguments: cat would read stdin for a file named "-".
cat <"$TARBALL" >"$WORK/installer.tar" || die "cannot read $TARBALL" 16
cat <"$SIGNATURE" >"$WORK/installer.sig" || die "cannot read $SIGNATURE" 16
cat <"$PUBKEY" >"$WORK/public.pem" || die "cannot read $PUBKEY" 16

if ! openssl dgst -sha256 -verify "$WORK/public.pem" -signature "$WORK/installer.sig" \
    "$WORK/installer.tar" >/dev/null 2>&1; then
    die "signature check FAILED for $TARBALL with $PUBKEY; nothing was installed" 10
fi
say "signature verified: $TARBALL ($PUBKEY)"

mkdir "$WORK/x"
tar -xf "$WORK/installer.tar" -C "$WORK/x" --no-same-owner --no-same-permissions \
    || die "cannot extract $TARBALL (not a tar archive, or no space in $WORK)" 14
SRC=$(find "$WORK/x" -mindepth 1 -maxdepth 1 -type d -name 'appliance-installer-*' | head -n 1)
[ -n "$SRC" ] && [ -f "$SRC/VERSION" ] && [ -f "$SRC/systemd/appliance.service" ] \
    || die "the tarball is not an appliance installer" 14
VERSION=$(cat "$SRC/VERSION")
[[ "$VERSION" =~ ^[0-9A-Za-z][0-9A-Za-z.+_-]*$ ]] || die "bad version in tarball: $VERSION" 14

# Only now, with a verified installer in hand, touch --root.
resolve_root create || die "cannot create $ROOT" 16

# 2. The service user and the directories.
if [ "$SYSTEM_INSTALL" = 1 ] && ! id appliance >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/appliance --no-create-home \
        --shell /usr/sbin/nologin appliance
    say "created system user appliance"
fi
install -d -m 0755 "$OPT" "$OPT/versions" "${ROOT%/}/etc/appliance" "${ROOT%/}/etc/systemd/system"
install -d -m 0750 "${ROOT%/}/var/lib/appliance"

# 3. The software, once per version, into its final path (venvs do not move).
DEST="$OPT/versions/$VERSION"
if [ -f "$DEST/.complete" ]; then
    say "version $VERSION is already installed"
else
    rm -rf "$DEST"
    mkdir -p "$DEST"
    cp -R "$SRC/wheelhouse" "$SRC/systemd" "$SRC/SECURITY.md" "$SRC/VERSION" "$DEST/"
    "$PYTHON" -m venv "$DEST/venv"
    # The installed command knows its root: appliance.paths reads this file.
    printf '%s\n' "$ROOT" > "$DEST/venv/appliance-root"
    PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "$DEST/venv/bin/python" -m pip install \
        --quiet --no-index --find-links "$DEST/wheelhouse" "custom-slm-appliance==$VERSION"
    touch "$DEST/.complete"
    say "installed version $VERSION into $DEST"
fi

# 4. Switch `current` atomically; keep what it pointed at as `previous`.
CURRENT=$(readlink "$OPT/current" 2>/dev/null || true)
if [ "$CURRENT" != "versions/$VERSION" ]; then
    if [ -n "$CURRENT" ]; then
        ln -sfn "$CURRENT" "$OPT/previous.new" && mv -T "$OPT/previous.new" "$OPT/previous"
    fi
    ln -sfn "versions/$VERSION" "$OPT/current.new" && mv -T "$OPT/current.new" "$OPT/current"
    say "current -> versions/$VERSION${CURRENT:+ (previous -> $CURRENT)}"
fi

install -d -m 0755 "${ROOT%/}/usr/local/bin"
ln -sfn "$OPT/current/venv/bin/appliance" "${ROOT%/}/usr/local/bin/appliance"

# 5. Units, and the release-signing keys that came with this installer.
for unit in "$SRC"/systemd/*.service "$SRC"/systemd/*.socket; do
    [ -f "$unit" ] || continue  # an unmatched glob
    install -m 0644 "$unit" "${ROOT%/}/etc/systemd/system/$(basename "$unit")"
done
for key in "$SRC"/keys/*.pem; do
    if APPLIANCE_ROOT="$ROOT" "$OPT/current/venv/bin/appliance" keys trust "$key" \
        --name "installer-$(basename "$key" .pem)" >/dev/null; then
        say "trusted release-signing key $(basename "$key" .pem)"
    else
        say "warning: release-signing key $(basename "$key" .pem) was not trusted (see above)"
    fi
done

if [ "$SYSTEM_INSTALL" = 1 ]; then
    chown -R appliance:appliance /var/lib/appliance
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        say "enable the service with: systemctl enable --now appliance.socket appliance.service"
    fi
fi
say "done: $OPT/current/venv/bin/appliance --version"
