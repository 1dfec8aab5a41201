//! CPUID for each vCPU: what KVM supports (`KVM_GET_SUPPORTED_CPUID`), patched with the vCPU's APIC
//! id, the VM's topology (one package, `n` cores, one thread per core), and the hypervisor bit.
//!
//! The topology is told consistently in every leaf Linux reads: leaf 1 (APIC id, logical count,
//! HTT), leaf 4 (Intel cores per package), leaves 0xb/0x1f (x2APIC topology), 0x80000008 (AMD core
//! count) and 0x8000001e (AMD extended APIC id).

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Topology level types of leaves 0xb/0x1f (ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` items (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// What the host's KVM offers beyond `KVM_GET_SUPPORTED_CPUID`.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostFeatures {
    /// `KVM_CAP_TSC_DEADLINE_TIMER`: the in-kernel LAPIC emulates TSC-deadline mode, which KVM
    /// does not report in the supported CPUID; without it Linux falls back to the slower
    /// periodic/one-shot LAPIC timer.
    pub tsc_deadline: bool,
}

/// Patches `entries` (a copy of the supported CPUID) for vCPU `cpu_index` of `vcpus`.
pub fn patch(entries: &mut [kvm_cpuid_entry2], cpu_index: u8, vcpus: u8, host: HostFeatures) {
    let apic_id = u32::from(cpu_index);
    let n = u32::from(vcpus);
    let core_bits = bits_for(n);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors, [15:8] CLFLUSH size/8.
                e.ebx = (apic_id << 24) | (n << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if host.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                if n > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            // EAX[31:26]: cores per package - 1; [25:14]: threads sharing this cache - 1.
            LEAF_CACHE_PARAMS if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((n - 1) << 26) | (sharing << 14);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0; // no SMT: shift 0
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = n;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_AMD_SIZE => {
                // ECX: [15:12] APIC id size, [7:0] cores - 1.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (n - 1);
            }
            LEAF_AMD_TOPOLOGY => {
                e.eax = apic_id; // extended APIC id
                e.ebx = apic_id & 0xff; // core id, one thread per core
                e.ecx = 0; // node 0, one node
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        let mut cache = entry(LEAF_CACHE_PARAMS, 3);
        cache.eax = 0x63; // type 3 (unified), level 3
        vec![
            entry(0, 0),
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0000,
                edx: EDX_HTT,
                ..Default::default()
            },
            cache,
            entry(LEAF_EXT_TOPOLOGY, 0),
            entry(LEAF_EXT_TOPOLOGY, 1),
            entry(LEAF_EXT_TOPOLOGY, 2),
            entry(LEAF_AMD_SIZE, 0),
            entry(LEAF_AMD_TOPOLOGY, 0),
        ]
    }

    fn find(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *e.iter().find(|x| x.function == f && x.index == i).unwrap()
    }

    #[test]
    fn apic_ids_and_topology_per_vcpu() {
        for (cpu, vcpus) in [(0u8, 1u8), (0, 2), (1, 2), (3, 4), (4, 5)] {
            let mut e = sample();
            patch(&mut e, cpu, vcpus, HostFeatures::default());
            let l1 = find(&e, 1, 0);
            assert_eq!(l1.ebx >> 24, u32::from(cpu), "leaf 1 APIC id");
            assert_eq!((l1.ebx >> 16) & 0xff, u32::from(vcpus));
            assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
            assert_eq!(l1.edx & EDX_HTT != 0, vcpus > 1);
            for sub in 0..3 {
                assert_eq!(find(&e, LEAF_EXT_TOPOLOGY, sub).edx, u32::from(cpu));
            }
            let core = find(&e, LEAF_EXT_TOPOLOGY, 1);
            assert_eq!(core.ebx, u32::from(vcpus));
            assert_eq!((core.ecx >> 8) & 0xff, LEVEL_CORE);
            assert!(1u32 << core.eax >= u32::from(vcpus));
            assert_eq!(find(&e, LEAF_EXT_TOPOLOGY, 2).ebx, 0);
            assert_eq!(find(&e, LEAF_AMD_SIZE, 0).ecx & 0xff, u32::from(vcpus) - 1);
            assert_eq!(find(&e, LEAF_AMD_TOPOLOGY, 0).eax, u32::from(cpu));
            assert_eq!(
                find(&e, LEAF_CACHE_PARAMS, 3).eax >> 26,
                u32::from(vcpus) - 1
            );
        }
    }

    #[test]
    fn tsc_deadline_only_when_kvm_emulates_it() {
        let mut e = sample();
        patch(&mut e, 0, 1, HostFeatures::default());
        assert_eq!(find(&e, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
        patch(&mut e, 0, 1, HostFeatures { tsc_deadline: true });
        assert_ne!(find(&e, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn bits() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }
}
