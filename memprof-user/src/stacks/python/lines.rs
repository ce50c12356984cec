//! Line tables: which source line an instruction belongs to, in each version's format
//! (`co_lnotab` up to 3.9, `co_linetable` of 3.10, the location table of 3.11 and later).

/// The line of byte offset `lasti` in a 3.8/3.9 `co_lnotab`: (bytecode delta, signed line
/// delta) byte pairs from `firstlineno` (`PyCode_Addr2Line`).
pub fn lnotab_line(lnotab: &[u8], firstlineno: i32, lasti: i64) -> i32 {
    let mut line = firstlineno;
    let mut addr = 0i64;
    for pair in lnotab.as_chunks::<2>().0 {
        addr += i64::from(pair[0]);
        if addr > lasti {
            break;
        }
        line = line.wrapping_add(i32::from(pair[1] as i8));
    }
    line
}

/// The line of byte offset `offset` in a 3.10 `co_linetable`: (unsigned bytecode delta, signed
/// line delta) byte pairs, a line delta of -128 meaning "no line" (Objects/lnotab_notes.txt).
pub fn linetable310_line(table: &[u8], firstlineno: i32, offset: i64) -> Option<i32> {
    let mut line = firstlineno;
    let mut start = 0i64;
    for pair in table.as_chunks::<2>().0 {
        let end = start + i64::from(pair[0]);
        let delta = pair[1] as i8;
        if delta != -128 {
            line = line.checked_add(i32::from(delta))?;
        }
        if start <= offset && offset < end {
            return (delta != -128).then_some(line);
        }
        start = end;
    }
    None
}

/// The line of byte offset `offset` in a 3.11+ location table (Objects/locations.md): entries
/// of a header byte `1CCCCLLL` (code, length - 1 in code units) and code-dependent varints.
pub fn locations_line(table: &[u8], firstlineno: i32, offset: i64) -> Option<i32> {
    let mut line = firstlineno;
    let mut start = 0i64;
    let mut i = 0usize;
    while i < table.len() {
        let head = table[i];
        i += 1;
        if head & 0x80 == 0 {
            return None;
        }
        let code = (head >> 3) & 15;
        let end = start + 2 * (i64::from(head & 7) + 1);
        let mut line_of_entry = Some(());
        match code {
            15 => line_of_entry = None,
            14 => {
                line = line.checked_add(svarint(table, &mut i)?)?;
                varint(table, &mut i)?;
                varint(table, &mut i)?;
                varint(table, &mut i)?;
            }
            13 => line = line.checked_add(svarint(table, &mut i)?)?,
            10..=12 => {
                line = line.checked_add(i32::from(code) - 10)?;
                i += 2;
            }
            _ => i += 1,
        }
        if start <= offset && offset < end {
            return line_of_entry.map(|()| line);
        }
        start = end;
    }
    None
}

fn varint(table: &[u8], i: &mut usize) -> Option<u32> {
    let mut b = *table.get(*i)?;
    *i += 1;
    let mut value = u32::from(b & 63);
    let mut shift = 6;
    while b & 64 != 0 {
        b = *table.get(*i)?;
        *i += 1;
        value |= u32::from(b & 63).checked_shl(shift)?;
        shift += 6;
    }
    Some(value)
}

fn svarint(table: &[u8], i: &mut usize) -> Option<i32> {
    let v = varint(table, i)?;
    Some(if v & 1 == 1 {
        -((v >> 1) as i32)
    } else {
        (v >> 1) as i32
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lnotab_lines() {
        // firstlineno 10; bytes 0..6 line 11, 6..14 line 12, 14.. line 14, then 300 bytes
        // later back one line (255 + 45, delta -1).
        let table = [0, 1, 6, 1, 8, 2, 255, 0, 45, 0xff];
        assert_eq!(lnotab_line(&table, 10, 0), 11);
        assert_eq!(lnotab_line(&table, 10, 5), 11);
        assert_eq!(lnotab_line(&table, 10, 6), 12);
        assert_eq!(lnotab_line(&table, 10, 13), 12);
        assert_eq!(lnotab_line(&table, 10, 14), 14);
        assert_eq!(lnotab_line(&table, 10, 313), 14);
        assert_eq!(lnotab_line(&table, 10, 314), 13);
        assert_eq!(lnotab_line(&[], 7, 4), 7);
    }

    #[test]
    fn linetable_310_lines() {
        // firstlineno 20; [0,4) line 21, [4,10) no line, [10,12) line 23 (a zero-length
        // entry adds 2 first), beyond: none.
        let table = [4, 1, 6, 0x80, 0, 1, 2, 1];
        assert_eq!(linetable310_line(&table, 20, 0), Some(21));
        assert_eq!(linetable310_line(&table, 20, 3), Some(21));
        assert_eq!(linetable310_line(&table, 20, 4), None);
        assert_eq!(linetable310_line(&table, 20, 10), Some(23));
        assert_eq!(linetable310_line(&table, 20, 12), None);
    }

    #[test]
    fn location_table_lines() {
        let table = [
            0xe8, 0x04, // no column (13), 1 unit, line +2
            0x81, 0x05, // short form (0), 2 units
            0xf8, // no location (15), 1 unit
            0xd8, 0x03, 0x09, // one line (11): +1, 1 unit
            0xf0, 0x07, 0x00, 0x41, 0x01, 0x00, // long (14): line -3, col 65 (two bytes)
        ];
        let line = |offset| locations_line(&table, 10, offset);
        assert_eq!(line(0), Some(12));
        assert_eq!(line(2), Some(12));
        assert_eq!(line(5), Some(12));
        assert_eq!(line(6), None, "no location");
        assert_eq!(line(8), Some(13));
        assert_eq!(line(10), Some(10));
        assert_eq!(line(12), None, "past the table");
        assert_eq!(line(-2), None, "before the code");
    }
}
