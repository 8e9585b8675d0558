#!/usr/bin/env bash
# Provision one VM of the lab (run by vagrant as root): provision.sh ROLE LINKS ROUTES
#   ROLE    gateway | host (daemon, role file nfq_tcpcrypt/roles/ROLE.toml) | client | server | plain
#   LINKS   ifname=mac=address/prefix[,...]: each lab interface is renamed by its MAC and addressed
#   ROUTES  network=via[,...]
# The source tree is at /opt/nfq_tcpcrypt/src (vagrant's rsync); the package is installed from it
# with `pip install -e` into /opt/nfq_tcpcrypt/venv (as scripts/setup does), from
# vagrant/.build/wheelhouse when present (no package index needed), otherwise from the index.
# The daemon runs as nfq-tcpcrypt.service (vagrant/units/).
set -euo pipefail
ROLE="$1" LINKS="$2" ROUTES="${3:-}"
SRC=/opt/nfq_tcpcrypt/src
VENV=/opt/nfq_tcpcrypt/venv
HERE="$SRC/vagrant"
export DEBIAN_FRONTEND=noninteractive

packages=(python3 python3-venv iptables nftables tcpdump curl iperf3 iproute2 kmod libnetfilter-queue1)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- lab interfaces: stable names (systemd .link by MAC), static addresses and routes (networkd) --
mkdir -p /etc/systemd/network
IFS=, read -r -a links <<< "$LINKS"
IFS=, read -r -a routes <<< "$ROUTES"
for link in "${links[@]}"; do
    IFS== read -r name mac address <<< "$link"
    current=""
    for dev in /sys/class/net/*; do
        [ "$(cat "$dev/address")" = "$mac" ] && current=$(basename "$dev")
    done
    [ -n "$current" ] || { echo "provision: no interface with MAC $mac" >&2; exit 1; }
    if [ "$current" != "$name" ]; then
        ip link set dev "$current" down
        ip link set dev "$current" name "$name"
    fi
    printf '[Match]\nMACAddress=%s\n\n[Link]\nName=%s\n' "$mac" "$name" > "/etc/systemd/network/05-lab-$name.link"
    {
        printf '[Match]\nName=%s\n\n[Network]\nAddress=%s\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n' "$name" "$address"
        prefix="${address%.*}."
        for route in "${routes[@]}"; do
            IFS== read -r destination via <<< "$route"
            [[ "$via" == "$prefix"* ]] && printf '\n[Route]\nDestination=%s\nGateway=%s\n' "$destination" "$via"
        done
    } > "/etc/systemd/network/20-lab-$name.network"
done
systemctl enable --now systemd-networkd >/dev/null 2>&1
networkctl reload
for link in "${links[@]}"; do
    IFS== read -r name mac address <<< "$link"
    networkctl reconfigure "$name"
    for _ in $(seq 100); do ip -4 addr show dev "$name" | grep -q "${address%/*}/" && break; sleep 0.2; done
    ip -4 addr show dev "$name" | grep -q "${address%/*}/" || { echo "provision: $name has no $address" >&2; exit 1; }
done
if [ "$ROLE" = gateway ]; then
    echo 'net.ipv4.ip_forward = 1' > /etc/sysctl.d/60-nfq-tcpcrypt-lab.conf
    sysctl -q -w net.ipv4.ip_forward=1
fi

# --- the package, as the README (scripts/setup) installs it: a venv, `pip install -e` ------------
# Only where a daemon runs (gateway, host): the other roles are unmodified machines.
if [ "$ROLE" = gateway ] || [ "$ROLE" = host ]; then
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    pip_args=()
    if [ -d "$HERE/.build/wheelhouse" ]; then
        pip_args=(--no-index --find-links "$HERE/.build/wheelhouse")
    fi
    # The build backend once into the venv, and no bytecode compiled ahead: pip is slow under TCG.
    # Pure Python (setup.py): compiling with mypyc takes minutes under TCG, and the lab checks
    # behaviour, not speed.
    "$VENV/bin/pip" install -q --no-compile "${pip_args[@]}" "setuptools>=68" wheel
    NFQ_TCPCRYPT_COMPILE=0 "$VENV/bin/pip" install -q --no-compile --no-build-isolation "${pip_args[@]}" -e "$SRC"
    ln -sf "$VENV/bin/nfq-tcpcrypt" /usr/local/bin/nfq-tcpcrypt
fi

# --- the role's services ----------------------------------------------------------------------
case "$ROLE" in
    gateway|host)
        install -d -m 0755 /etc/nfq-tcpcrypt
        install -m 0644 "$SRC/nfq_tcpcrypt/roles/$ROLE.toml" /etc/nfq-tcpcrypt/nfq-tcpcrypt.toml
        install -d -m 0700 /var/lib/nfq-tcpcrypt
        install -m 0644 "$HERE/units/nfq-tcpcrypt.service" /etc/systemd/system/
        systemctl daemon-reload
        systemctl enable nfq-tcpcrypt.service >/dev/null 2>&1
        systemctl restart nfq-tcpcrypt.service
        deadline=$((SECONDS + 180))
        while [ "$SECONDS" -lt "$deadline" ] && systemctl is-active -q nfq-tcpcrypt.service; do
            [ -S /run/nfq-tcpcrypt/control.sock ] && nfq-tcpcrypt sessions >/dev/null 2>&1 && break
            sleep 1
        done
        nfq-tcpcrypt sessions >/dev/null || { journalctl -u nfq-tcpcrypt -n 30 --no-pager >&2; exit 1; }
        ;;
esac
case "$ROLE" in
    server|host|plain)
        install -d -m 0755 /srv/www
        install -m 0644 "$HERE/units/lab-www.service" "$HERE/units/lab-iperf3.service" /etc/systemd/system/
        systemctl daemon-reload
        systemctl enable --now lab-www.service lab-iperf3.service >/dev/null 2>&1
        ;;
esac
echo "provision: $(hostname) ready as $ROLE"
