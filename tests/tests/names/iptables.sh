# kube-proxy's iptables mode, through iptables-nft, as its proxier writes KUBE-SERVICES
# (pkg/proxy/iptables/proxier.go): comment, protocol match, destination, port, jump.
# Run inside the namespace: ip netns exec NS sh iptables.sh
set -e
ipt() { iptables-nft -w -t nat "$@"; }
ip6t() { ip6tables-nft -w -t nat "$@"; }
for c in KUBE-SERVICES KUBE-NODEPORTS KUBE-SVC-NPX46M4PTMTKRN6Y KUBE-SVC-TCOU7JCQXEZGVUNU KUBE-SVC-ERIFXISQEP7F7OF4 KUBE-EXT-HVFWP5L3HBRCKNPE; do ipt -N $c; done
ipt -A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
ipt -A KUBE-SERVICES -m comment --comment "default/kubernetes:https cluster IP" -m tcp -p tcp -d 10.96.0.1/32 --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
ipt -A KUBE-SERVICES -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp -p udp -d 10.96.0.10/32 --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
ipt -A KUBE-SERVICES -m comment --comment "kube-system/kube-dns:dns-tcp cluster IP" -m tcp -p tcp -d 10.96.0.10/32 --dport 53 -j KUBE-SVC-ERIFXISQEP7F7OF4
ipt -A KUBE-SERVICES -m comment --comment "shop/front:http external IP" -m tcp -p tcp -d 192.0.2.80/32 --dport 80 -j KUBE-EXT-HVFWP5L3HBRCKNPE
# Not a VIP: a prefix, a negated address, no comment, and the NodePort catch-all.
ipt -A KUBE-SERVICES -m comment --comment "a prefix" -m tcp -p tcp -d 10.96.0.0/16 --dport 1 -j RETURN
ipt -A KUBE-SERVICES -m comment --comment "negated" -m tcp -p tcp ! -d 10.96.0.2/32 --dport 2 -j RETURN
ipt -A KUBE-SERVICES -m tcp -p tcp -d 10.96.0.3/32 --dport 3 -j RETURN
ipt -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
for c in KUBE-SERVICES KUBE-SVC-7MNQLBJTKUDZ6SJQ; do ip6t -N $c; done
ip6t -A KUBE-SERVICES -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp -p udp -d fd00:96::10/128 --dport 53 -j KUBE-SVC-7MNQLBJTKUDZ6SJQ
