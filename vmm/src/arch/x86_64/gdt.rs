//! GDT entries and their conversion to KVM segment registers.
//!
//! The boot GDT holds: null, 64-bit code, data, TSS (long mode), or null, 32-bit code, data, TSS
//! (PVH's 32-bit protected-mode entry). Selectors are `index * 8`.

use kvm_bindings::kvm_segment;

/// Packs a GDT entry from flags (`0xAFxx` style: granularity/size nibble in bits 12..16, access byte
/// in 0..8), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let limit = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32;
    // Granularity 4 KiB: the limit counts pages.
    if (entry >> 55) & 1 == 1 {
        (limit << 12) | 0xfff
    } else {
        limit
    }
}

/// The KVM segment register described by GDT entry `entry` at index `index`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u64| ((entry >> n) & 1) as u8;
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        padding: 0,
        unusable: u8::from(bit(47) == 0),
    }
}

/// The four-entry GDT for a 64-bit (long-mode) entry.
pub const GDT_64: [u64; 4] = [
    gdt_entry(0, 0, 0),            // null
    gdt_entry(0xa09b, 0, 0xfffff), // code: 64-bit, present, execute/read, accessed
    gdt_entry(0xc093, 0, 0xfffff), // data: 32-bit, 4 KiB granularity, read/write, accessed
    gdt_entry(0x808b, 0, 0xfffff), // TSS: 32-bit busy
];

/// The four-entry GDT for PVH's 32-bit protected-mode entry.
pub const GDT_32: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xffff_ffff), // code: 32-bit, 4 KiB granularity
    gdt_entry(0xc093, 0, 0xffff_ffff), // data
    gdt_entry(0x008b, 0, 0x67),        // TSS
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_64() {
        let seg = kvm_segment_from_gdt(GDT_64[1], 1);
        assert_eq!(seg.selector, 0x8);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.l, 1, "long mode code segment");
        assert_eq!(seg.db, 0, "L and D/B must not both be set");
        assert_eq!(seg.s, 1);
        assert_eq!(seg.g, 1);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn data_and_tss_segments() {
        let data = kvm_segment_from_gdt(GDT_64[2], 2);
        assert_eq!(
            (data.selector, data.type_, data.db, data.l),
            (0x10, 0x3, 1, 0)
        );
        let tss = kvm_segment_from_gdt(GDT_64[3], 3);
        assert_eq!((tss.selector, tss.type_, tss.s), (0x18, 0xb, 0));
    }

    #[test]
    fn code_segment_32() {
        let seg = kvm_segment_from_gdt(GDT_32[1], 1);
        assert_eq!((seg.l, seg.db, seg.g, seg.limit), (0, 1, 1, 0xffff_ffff));
    }

    #[test]
    fn entry_round_trips_base_and_limit() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let seg = kvm_segment_from_gdt(e, 5);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        let null = kvm_segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }
}
